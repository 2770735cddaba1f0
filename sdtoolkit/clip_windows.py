r"""Prompts as AUTOMATIC1111 reads them: emphasis, BREAK, and text longer than CLIP's 77 tokens, in windows.

CLIP's text encoder reads 77 tokens: a start token, up to 75 of the text's, an end token, padding. A longer
text is split into windows of 75 tokens. When a window is full and more tokens come, it ends after its last
comma instead, if one is among its last 20 tokens, so a tag is not cut in two. Each window is encoded on its
own, and the outputs are put one after the other (77 embeddings per window). gradio_app.py serves long prompts
this way, and --max_token_length trains on long captions this way. (kohya-ss's trainer joins the windows without
their inner start and end tokens.)

Prompts (and, with --weighted_captions, training captions) may also weight their words in AUTOMATIC1111's syntax:
(word) 1.1 times, ((word)) 1.21 times, [word] 1/1.1 times, (word:1.4) 1.4 times; \( \) \[ \] are the brackets
themselves, and BREAK starts a new window. A weighted token's embedding is scaled by its weight, then the window's
embeddings are scaled back to the mean they had, as AUTOMATIC1111's default ("Original") emphasis does.

    parse_emphasis(text)                       # [(text, weight), ..., None where BREAK is, ...]
    plain_text(text)                           # the prompt's words alone
    unsupported_syntax(text)                   # AUTOMATIC1111 syntax not read here (prompt editing, [a|b], AND)
    token_windows(tokenizer, pieces)           # [(77 ids, 77 weights), ...]: as many windows as the text needs
    read_caption(tokenizer, text, weighted)    # [(77 ids, 77 weights), ...]: a caption's own windows, however many
    caption_windows(tokenizer, text, count)    # (ids [count, 77], mask [count], weights [count, 77]): padded with
                                               # empty windows, or cut; weighted=True parses emphasis and BREAK
    encode_text(text_encoder, ids, clip_skip)  # ids [n, 77] -> embeddings [n, 77, dim], of the layer clip_skip asks
    encode_windows(text_encoder, ids)          # ids [n, count, 77] -> embeddings [n, count * 77, dim]
    token_mask(window_mask)                    # [n, count] -> [n, count * 77], the UNet's encoder_attention_mask
    emphasize(hidden, weights)                 # embeddings scaled by their tokens' weights, each window to its mean
    encode_prompts(pipeline, prompt, negative_prompt, guidance)   # a pipeline's prompt_embeds, parsed as above

A batch of captions with different numbers of windows is padded with empty windows, which the mask keeps out of
the UNet's cross-attention: each caption conditions the UNet on its own windows alone, as when it is served.
"""

import re

import torch

from sdtoolkit.embeddings import embedding_tokens

WINDOW = 77  # ids per window: start, 75 of the text's tokens, end, padding
WINDOW_TOKENS = 75
COMMA_BACKTRACK = 20
BRACKET_WEIGHTS = {"(": 1.1, "[": 1 / 1.1}  # what one pair of round or square brackets multiplies by

# The pieces of a prompt: an escaped bracket or backslash, an opening bracket, ":1.4)" (a weight and the round
# bracket it closes), a closing bracket, a run of plain text, or a lone backslash or colon.
EMPHASIS = re.compile(r"\\[()\[\]\\]|[(\[]|:\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)|[)\]]|[^\\()\[\]:]+|[\\:]")
BREAK = re.compile(r"\s*\bBREAK\b\s*")


def parse_emphasis(text):
    """A prompt as [(text, weight), ...], in order, with None where a BREAK is. Brackets nest and their weights
    multiply; a bracket left open weights the rest of the prompt, and a closing one with nothing open is text."""
    pieces = []  # [text, weight] lists while weights are applied; None for BREAK
    opened = {"(": [], "[": []}  # where each open bracket began, in pieces

    def weigh(start, factor):
        for piece in pieces[start:]:
            if piece is not None:
                piece[1] *= factor

    for match in EMPHASIS.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token in opened:
            opened[token].append(len(pieces))
        elif weight is not None and opened["("]:
            weigh(opened["("].pop(), float(weight))
        elif token == ")" and opened["("]:
            weigh(opened["("].pop(), BRACKET_WEIGHTS["("])
        elif token == "]" and opened["["]:
            weigh(opened["["].pop(), BRACKET_WEIGHTS["["])
        else:
            literal = token[1] if token.startswith("\\") and len(token) == 2 else token
            for i, part in enumerate(BREAK.split(literal)):
                if i > 0:
                    pieces.append(None)
                pieces.append([part, 1.0])
    for bracket, starts in opened.items():
        for start in starts:
            weigh(start, BRACKET_WEIGHTS[bracket])
    # Neighbours of the same weight become one piece, tokenized together.
    merged = []
    for piece in pieces:
        if piece is not None and merged and merged[-1] is not None and merged[-1][1] == piece[1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [None if piece is None else tuple(piece) for piece in merged] or [("", 1.0)]


# AUTOMATIC1111 syntax that this toolkit does not read: prompt editing ([from:to:when], [to:when], [from::when],
# `when` a step or a fraction of the steps), alternation ([a|b], one word a step) and composable diffusion's AND.
# Read as plain text, they would give another image than AUTOMATIC1111's without a word, so they are refused.
PROMPT_EDITING = re.compile(r"(?<!\\)\[[^\[\]]*:\s*(\d+\.?\d*|\.\d+)\s*\]")
ALTERNATION = re.compile(r"(?<!\\)\[[^\[\]]*\|[^\[\]]*\]")
COMPOSABLE = re.compile(r"\bAND\b")


def unsupported_syntax(text):
    """What of AUTOMATIC1111's prompt syntax `text` uses that is not read here, as a sentence; None if nothing."""
    brackets = "escape the brackets as \\[ \\] to mean them as text"
    for pattern, what, instead in (
        (PROMPT_EDITING, "prompt editing ([from:to:when])", brackets),
        (ALTERNATION, "alternation ([a|b])", brackets),
        (COMPOSABLE, "composable diffusion (AND)", "write 'and' to mean the word"),
    ):
        found = pattern.search(text)
        if found:
            return f"{found.group(0)!r} is AUTOMATIC1111's {what}, which this toolkit does not read; {instead}"
    return None


def plain_text(text):
    """A prompt's words without its emphasis brackets, weights and BREAKs: "a (red:1.3) cat BREAK hat" -> "a red cat
    hat", what a reader (or a CLIP score) takes it to say."""
    return " ".join(" ".join(piece[0] for piece in parse_emphasis(text) if piece is not None).split())


def token_windows(tokenizer, pieces):
    """[(77 ids, 77 weights), ...]: the windows of parsed pieces (see parse_emphasis). One window for a text that
    fits, tokenized as the pipeline tokenizes it; one empty window for nothing."""
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    vectors = embedding_tokens(tokenizer)  # a textual inversion embedding's name: all of its vectors' tokens
    windows = []
    tokens, weights, last_comma = [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        padding = WINDOW_TOKENS - len(tokens)
        windows.append(([start, *tokens, end] + [pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding))
        tokens, weights, last_comma = [], [], -1

    for piece in pieces:
        if piece is None:  # BREAK
            close()
            continue
        text, weight = piece
        # verbose=False: transformers would warn that a text longer than 77 tokens breaks the model; windows do not.
        ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
        for token in [vector for token in ids for vector in vectors.get(token, [token])]:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == WINDOW_TOKENS and last_comma >= 0 and WINDOW_TOKENS - last_comma <= COMMA_BACKTRACK:
                # A full window ends after its last comma; the tokens after it move on to the next window.
                moved = tokens[last_comma + 1 :], weights[last_comma + 1 :]
                tokens, weights = tokens[: last_comma + 1], weights[: last_comma + 1]
                close()
                tokens, weights = moved
            if len(tokens) == WINDOW_TOKENS:
                close()
            tokens.append(token)
            weights.append(weight)
    if tokens or not windows:
        close()
    return windows


def read_caption(tokenizer, text, weighted=False):
    """A training caption's windows, [(77 ids, 77 weights), ...]: read literally, its weights all 1, or with
    weighted=True (--weighted_captions) as a prompt, for emphasis and BREAK (see parse_emphasis)."""
    return token_windows(tokenizer, parse_emphasis(text) if weighted else [(text, 1.0)])


def caption_windows(tokenizer, text, count, weighted=False):
    """(ids [count, 77], mask [count], weights [count, 77]) of a caption read in at most `count` windows (see
    read_caption): its own windows (mask 1), cut after the count-th, then empty windows (mask 0)."""
    windows = read_caption(tokenizer, text, weighted)[:count]
    mask = [1.0] * len(windows) + [0.0] * (count - len(windows))
    windows += token_windows(tokenizer, [("", 1.0)]) * (count - len(windows))
    return (
        torch.tensor([ids for ids, _ in windows]),
        torch.tensor(mask),
        torch.tensor([weights for _, weights in windows]),
    )


def encode_text(text_encoder, ids, clip_skip=1):
    """The text encoder's output for token ids [n, 77]. With clip_skip N above 1, the output of its N-th layer from
    the end instead, through its final layer norm: AUTOMATIC1111's "Clip skip" and kohya-ss's --clip_skip (2 for
    models trained on CLIP's second-to-last layer, as NovelAI's and most anime models were)."""
    if clip_skip == 1:
        return text_encoder(ids, return_dict=False)[0]
    hidden_states = text_encoder(ids, output_hidden_states=True, return_dict=True).hidden_states  # embeddings, layers
    # (A text encoder wrapped for several processes keeps its layers in .module.)
    return getattr(text_encoder, "module", text_encoder).final_layer_norm(hidden_states[-clip_skip])


def encode_windows(text_encoder, ids, clip_skip=1):
    """The text encoder's output for ids [n, count, 77], window by window: [n, count * 77, dim]."""
    n, count, length = ids.shape
    hidden = encode_text(text_encoder, ids.reshape(n * count, length), clip_skip)
    return hidden.reshape(n, count * length, hidden.shape[-1])


def token_mask(window_mask):
    """A window mask [n, count] as a mask over the embeddings [n, count * 77]."""
    return window_mask.repeat_interleave(WINDOW, dim=1)


def emphasize(hidden, weights):
    """AUTOMATIC1111's emphasis ("Original"): each token's embedding times its weight, then each window scaled back
    to the mean it had (over its 77 tokens and their features). hidden: [..., dim] with 77 tokens a window, e.g.
    [count, 77, dim] or [n, count * 77, dim]; weights: as many, e.g. [count, 77] or [n, count, 77]. A window whose
    weights are all 1 is left exactly as it is; which ones those are is worked out on the device, without looking
    at the weights from the host (which on a GPU would wait for it)."""
    shape = hidden.shape
    windows = hidden.reshape(-1, WINDOW, shape[-1])
    weights = weights.reshape(-1, WINDOW, 1).to(windows.dtype)
    weighted = windows * weights
    plain = (weights == 1).all(dim=1, keepdim=True)  # (windows, 1, 1)
    one = torch.ones_like(plain, dtype=windows.dtype)
    mean, new_mean = windows.mean(dim=(1, 2), keepdim=True), weighted.mean(dim=(1, 2), keepdim=True)
    # A plain window's factor is 1, not mean / mean: a window whose mean is 0 would make that NaN.
    return (weighted * torch.where(plain, one, mean / torch.where(plain, one, new_mean))).reshape(shape)


def encode_prompts(pipeline, prompt, negative_prompt, guidance, clip_skip=1):
    """(prompt embeddings, negative embeddings or None without guidance) for one image, both parsed for emphasis
    and BREAK and read in windows. The shorter is padded with empty windows to as many as the longer, as
    classifier-free guidance needs two of the same length. A prompt that fits one window, without emphasis, gives
    the pipeline's own encode_prompt's embeddings; clip_skip, as encode_text."""
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    windows = token_windows(tokenizer, parse_emphasis(prompt))
    negative_windows = token_windows(tokenizer, parse_emphasis(negative_prompt or "")) if guidance else []
    count = max(len(windows), len(negative_windows))
    empty = token_windows(tokenizer, [("", 1.0)])[0]

    def encode(windows):
        windows = windows + [empty] * (count - len(windows))
        ids = torch.tensor([ids for ids, _ in windows], device=pipeline.device)
        weights = torch.tensor([weights for _, weights in windows], device=pipeline.device)
        hidden = encode_text(text_encoder, ids, clip_skip)  # (count, 77, dim)
        if (weights != 1).any():  # else exactly the pipeline's own embeddings
            hidden = emphasize(hidden, weights)
        return hidden.reshape(1, count * WINDOW, hidden.shape[-1]).to(text_encoder.dtype)

    return encode(windows), encode(negative_windows) if guidance else None
