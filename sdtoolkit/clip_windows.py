"""Text longer than CLIP's 77 tokens, read in windows, as AUTOMATIC1111 reads long prompts.

CLIP's text encoder reads 77 tokens: a start token, up to 75 of the text's, an end token, padding. A longer
text is split into windows of 75 tokens. A window ends after the last comma instead when one is among its last
20 tokens, so a tag is not cut in two. Each window is encoded on its own, and the outputs are put one after the
other (77 embeddings per window). gradio_app.py serves long prompts this way, and --max_token_length trains on
long captions this way. (kohya-ss's trainer joins the windows without their inner start and end tokens.)

    prompt_windows(tokenizer, text)            # [[77 ids], ...]: as many windows as the text needs
    caption_windows(tokenizer, text, count)    # (ids [count, 77], mask [count]): padded with empty windows, or cut
    encode_windows(text_encoder, ids)          # ids [n, count, 77] -> embeddings [n, count * 77, dim]
    token_mask(window_mask)                    # [n, count] -> [n, count * 77], the UNet's encoder_attention_mask
    encode_prompts(pipeline, prompt, negative_prompt, guidance)   # a pipeline's prompt_embeds, long prompts too

A batch of captions with different numbers of windows is padded with empty windows, which the mask keeps out of
the UNet's cross-attention: each caption conditions the UNet on its own windows alone, as when it is served.
"""

import torch

WINDOW = 77  # ids per window: start, 75 of the text's tokens, end, padding
WINDOW_TOKENS = 75
COMMA_BACKTRACK = 20


def prompt_windows(tokenizer, text):
    """The token ids of `text` as CLIP windows: lists of 77 ids. One window for a text that fits, as the pipeline
    tokenizes it; one empty window for ""."""
    # verbose=False: transformers would warn that a text longer than 77 tokens breaks the model; windows do not.
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    windows, current = [], []
    for token in ids:
        current.append(token)
        if len(current) == WINDOW_TOKENS:
            commas = [i for i, t in enumerate(current) if t == comma]
            cut = commas[-1] + 1 if commas and WINDOW_TOKENS - commas[-1] <= COMMA_BACKTRACK else WINDOW_TOKENS
            windows.append(current[:cut])
            current = current[cut:]
    if current or not windows:
        windows.append(current)
    start, end, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    return [[start, *window, end] + [pad] * (WINDOW_TOKENS - len(window)) for window in windows]


def caption_windows(tokenizer, text, count):
    """(ids [count, 77], mask [count]) of a caption read in at most `count` windows: its own windows (mask 1),
    cut after the count-th, then empty windows (mask 0)."""
    windows = prompt_windows(tokenizer, text)[:count]
    mask = [1.0] * len(windows) + [0.0] * (count - len(windows))
    windows += prompt_windows(tokenizer, "") * (count - len(windows))
    return torch.tensor(windows), torch.tensor(mask)


def encode_windows(text_encoder, ids):
    """The text encoder's output for ids [n, count, 77], window by window: [n, count * 77, dim]."""
    n, count, length = ids.shape
    hidden = text_encoder(ids.reshape(n * count, length), return_dict=False)[0]
    return hidden.reshape(n, count * length, hidden.shape[-1])


def token_mask(window_mask):
    """A window mask [n, count] as a mask over the embeddings [n, count * 77]."""
    return window_mask.repeat_interleave(WINDOW, dim=1)


def encode_prompts(pipeline, prompt, negative_prompt, guidance):
    """(prompt embeddings, negative embeddings or None without guidance) for one image. Prompts that fit CLIP's
    window go through the pipeline's own encode_prompt; a longer one is encoded window by window, and the other
    prompt is padded with empty windows to as many, as classifier-free guidance needs two of the same length."""
    tokenizer, text_encoder = pipeline.tokenizer, pipeline.text_encoder
    windows = prompt_windows(tokenizer, prompt)
    negative_windows = prompt_windows(tokenizer, negative_prompt or "") if guidance else []
    if len(windows) == 1 and len(negative_windows) <= 1:
        return pipeline.encode_prompt(
            prompt, pipeline.device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt or None,
        )  # fmt: skip
    count = max(len(windows), len(negative_windows))
    empty = prompt_windows(tokenizer, "")[0]

    def encode(windows):
        ids = torch.tensor([windows + [empty] * (count - len(windows))], device=pipeline.device)
        return encode_windows(text_encoder, ids).to(text_encoder.dtype)

    return encode(windows), encode(negative_windows) if guidance else None
