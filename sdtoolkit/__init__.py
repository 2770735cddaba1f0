"""Code shared by the toolkit's scripts (train_text_to_image.py, metrics.py, gradio_app.py).

- fixtures: offline Stable Diffusion and CLIP folders with random weights and the real CLIP tokenizer.
- demo_dataset: the small bundled image-caption dataset in the pokemon-blip-captions schema.
- data: checking a dataset before training; training examples with per-example randomness.
- latent_cache: the --cache_latents cache of latents and caption embeddings, in memory or on disk.
- held_out: the loss on held-out images at fixed timesteps and noise (--validation_split).
- clip_windows: prompts and captions as AUTOMATIC1111 reads them (emphasis, BREAK, 75-token windows).
- buckets: aspect-ratio buckets (shapes, assignment, cover-and-crop, one bucket per batch).
- caption_folders: folders of images with same-named caption files, and kohya's N_name repeat folders.
- dataset_config: kohya-ss's --dataset_config files (image folders and data options in TOML or JSON).
- learning_check: the diffusion classifier that tells whether a model learned its captions.
- losses: kohya-ss's loss options for the training step (pseudo-Huber losses, debiased estimation).
- evaluation: paired bootstrap comparisons and distances between image sets in CLIP space (metrics.py).
- lora: LoRA adapters, their files in diffusers' and kohya-ss's keys; lycoris: LyCORIS LoHa and LoKr files.
- export: one-file SD 1.x checkpoints for AUTOMATIC1111 and ComfyUI.
- embeddings: textual inversion embeddings from a folder.
- checkpoints: atomic checkpoints and final pipeline saves.
- output_dir: the lock on --output_dir, one run per folder, and the run identity stored in checkpoints.
- ema: an in-place, multi-tensor EMA of the UNet weights.
- inference: picking a device and dtype, and loading a pipeline with clear errors (metrics.py, gradio_app.py).
- serving: gradio_app.py's image generation: one queue for the page and the API, parameters in every PNG.
- images_api: gradio_app.py's OpenAI-compatible /v1/images/generations, /v1/models and /health.
- a1111_api: gradio_app.py's AUTOMATIC1111 API, /sdapi/v1.
- errors: the one-line error that every script prints for bad input.
- launch: `accelerate launch` with the script's own error line last and its exit code (train.sh uses it).
"""
