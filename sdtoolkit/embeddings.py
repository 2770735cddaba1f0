"""Textual inversion embeddings, as AUTOMATIC1111 serves them: a folder of files, each a word of its own.

An embedding file holds one or more vectors of the text encoder's input size. Its file name, without the
extension, becomes a word of the prompt: "EasyNegative.safetensors" is used by writing EasyNegative (CLIP reads
text in lower case, so any case) in a prompt or a negative prompt, also inside emphasis: (EasyNegative:1.2).
gradio_app.py --embeddings_dir loads a folder of them, and its sub-folders.

    load_embeddings(pipeline, folder)    # ({name: vectors}, [(file name, why it was skipped), ...])
    embedding_tokens(tokenizer)          # {first token id: [the ids of all its vectors]}, for multi-vector ones

Only .safetensors files are read: AUTOMATIC1111's .pt embeddings are pickles, which can run code when loaded.
A file is loaded through diffusers' load_textual_inversion, under its file name. A file that can't be used (a
pickle, vectors of another size, more than one tensor, a name the tokenizer already has) is skipped with its
reason, and the others are loaded.
"""

import os

from safetensors import SafetensorError
from safetensors.torch import load_file

from sdtoolkit.errors import UserError

# Files in folders of embeddings and LoRAs that are never opened.
PICKLES = (".pt", ".bin", ".ckpt", ".pth")


def safetensors_files(folder):
    """The .safetensors files in `folder` and its sub-folders, as AUTOMATIC1111 searches its folders of embeddings
    and LoRAs: ([(path, path within the folder, file name without .safetensors), ...], [(path within the folder,
    why skipped), ...] for the pickle files). Other files (previews, notes) are left alone."""
    found, pickles = [], []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for file_name in sorted(names):
            path = os.path.join(root, file_name)
            shown = os.path.relpath(path, folder)
            stem, extension = os.path.splitext(file_name)
            if extension.lower() in PICKLES:
                pickles.append((shown, "a pickle file, which can run code when loaded; use its .safetensors"))
            elif extension.lower() == ".safetensors":
                found.append((path, shown, stem))
    return found, pickles


def embedding_tokens(tokenizer):
    """{id of a multi-vector embedding's token: [its ids, one per vector]}. diffusers adds such an embedding as
    the tokens name, name_1, name_2, ... and its pipelines expand the name in the prompt's text; token_windows
    expands it in the ids instead, where the case of the name no longer matters."""
    added = tokenizer.added_tokens_encoder
    expanded = {}
    for name, token_id in added.items():
        ids, i = [token_id], 1
        while f"{name}_{i}" in added:
            ids.append(added[f"{name}_{i}"])
            i += 1
        if len(ids) > 1:
            expanded[token_id] = ids
    return expanded


def load_embeddings(pipeline, folder):
    """Load every usable embedding file in `folder` (and its sub-folders) into the pipeline's tokenizer and text
    encoder. Returns ({name: number of vectors}, [(file name, reason), ...] for the files skipped)."""
    if not os.path.isdir(folder):
        raise UserError(f"--embeddings_dir {folder}: no such folder")
    size = pipeline.text_encoder.get_input_embeddings().weight.shape[-1]
    files, skipped = safetensors_files(folder)
    loaded = {}
    for path, file_name, stem in files:
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as err:
            skipped.append((file_name, f"not a readable .safetensors file ({err})"))
            continue
        if len(tensors) != 1:
            skipped.append((file_name, f"holds {len(tensors)} tensors ({', '.join(sorted(tensors))}), not one"))
            continue
        vectors = next(iter(tensors.values()))
        vectors = vectors[None] if vectors.dim() == 1 else vectors  # one vector, saved without its row
        if vectors.dim() != 2 or vectors.shape[-1] != size:
            skipped.append((file_name, f"vectors of shape {tuple(vectors.shape)}; this text encoder takes {size}"))
            continue
        # In lower case, as CLIP reads prompts (its tokenizer finds an added word in any case either way).
        name = stem.lower()
        try:
            pipeline.load_textual_inversion(vectors.to(pipeline.text_encoder.dtype), token=name)
        except ValueError as err:  # the name is a token the tokenizer already has
            skipped.append((file_name, str(err).split(". ")[0]))
            continue
        loaded[name] = vectors.shape[0]
    return loaded, skipped
