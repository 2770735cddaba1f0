#!/usr/bin/env python
"""A Gradio demo of a fine-tuned Stable Diffusion pipeline, for people in a browser and for programs.

    python gradio_app.py                                   # serves sd-pokemon-model on http://127.0.0.1:7860
    python gradio_app.py --model_path demo/sd-demo-model   # the model `make demo` trained
    python gradio_app.py --host 0.0.0.0 --auth me:secret   # reachable from other devices, behind a login
    python gradio_app.py --share                           # a temporary public *.gradio.live link

Other programs call the `/generate` endpoint with gradio_client (see the README). Requests wait in a bounded
queue and run `--concurrency` at a time, so a few users at once can't knock the GPU over.
"""

import argparse
import random

import gradio as gr
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from sdtoolkit.errors import UserError, run_main
from sdtoolkit.inference import add_device_arguments, add_model_config_argument, load_pipeline, pick_device_and_dtype

TITLE = "Pokémon text-to-image"
DESCRIPTION = (
    "Stable Diffusion v1-4 fine-tuned on pokemon-blip-captions: describe anything and it comes out as a Pokémon."
    " Leave the seed blank for a random one; the seed used is shown under the images so you can make the same"
    " picture again."
)
EXAMPLES = ["yoda", "pikachu", "charmander"]

# DPM-Solver++ (https://arxiv.org/abs/2211.01095): its paper samples well in 15-25 steps; 25 is half PNDM's 50.
SCHEDULERS = {
    "DPM-Solver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "PNDM": PNDMScheduler.from_config,
    "DDIM": DDIMScheduler.from_config,
    "Euler ancestral": EulerAncestralDiscreteScheduler.from_config,
}
DEFAULT_SCHEDULER = "DPM-Solver++"
DEFAULT_STEPS = 25
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIZE, MAX_SIZE = 64, 1024
MAX_IMAGES = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve a Stable Diffusion pipeline as a Gradio demo and API.")
    parser.add_argument(
        "--model_path", default="sd-pokemon-model", help="Pipeline folder, hub id, or SD 1.x .safetensors file."
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on; 0.0.0.0 for other devices.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="Also open a temporary public Gradio link.")
    parser.add_argument("--auth", default=None, help="user:password to require a login.")
    parser.add_argument(
        "--lora", default=None, help="A LoRA to load on top of --model_path (folder or .safetensors file)."
    )
    add_model_config_argument(parser)
    add_device_arguments(parser)
    parser.add_argument("--max_queue", type=int, default=16, help="Requests that may wait; more are refused.")
    parser.add_argument("--concurrency", type=int, default=1, help="Requests generated at the same time.")
    parser.add_argument(
        "--cache_max_age",
        type=int,
        default=3600,
        help=(
            "Seconds an image Gradio served stays in its file cache (GRADIO_TEMP_DIR) before it is deleted; the"
            " cache is checked every min(age, 10 minutes) and emptied when the server stops."
        ),
    )
    args = parser.parse_args(argv)

    if args.auth is not None and (":" not in args.auth or args.auth.startswith(":") or args.auth.endswith(":")):
        raise UserError("--auth must be user:password")
    if args.max_queue < 1 or args.concurrency < 1:
        raise UserError("--max_queue and --concurrency must be at least 1")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if args.cache_max_age < 1:
        raise UserError(f"--cache_max_age must be at least 1 second, got {args.cache_max_age}")
    return args


def parse_seed(seed):
    """The seed box: blank means a random seed; anything else must be a whole number."""
    text = "" if seed is None else str(seed).strip()
    if text == "":
        return random.randint(0, 2**32 - 1)
    try:
        value = int(text)
    except ValueError:
        try:
            number = float(text)
        except ValueError:
            raise gr.Error(f"The seed must be a whole number or blank, not '{text}'.") from None
        if not number.is_integer():
            raise gr.Error(f"The seed must be a whole number or blank, not '{text}'.") from None
        value = int(number)
    if not 0 <= value < 2**64:
        raise gr.Error("The seed must be between 0 and 2^64 - 1.")
    return value


def check_request(prompt, steps, width, height, num_images):
    """Raise gr.Error with a message for the person if an input is unusable.

    Gradio's sliders and dropdown already refuse values outside their range or choices, with their own
    message; what is left is what they can't express.
    """
    if not prompt or not prompt.strip():
        raise gr.Error("Please type a prompt.")
    for name, value in (("Steps", steps), ("Images", num_images), ("Width", width), ("Height", height)):
        if float(value) != int(value):
            raise gr.Error(f"{name} must be a whole number, got {value}.")
    for name, value in (("Width", width), ("Height", height)):
        if int(value) % 8 != 0:
            raise gr.Error(f"{name} must be divisible by 8 (the VAE works on 8x8 pixel blocks), got {int(value)}.")


def count_tokens(tokenizer, text):
    """Tokens CLIP would see for this text, start and end tokens included, before truncation."""
    return len(tokenizer(text, truncation=False).input_ids)


def make_generate(pipeline):
    """The function behind the Generate button and the /generate endpoint."""
    device = pipeline.device
    tokenizer = pipeline.tokenizer

    def generate(prompt, negative_prompt, steps, guidance_scale, seed, scheduler, width, height, num_images):
        check_request(prompt, steps, width, height, num_images)
        seed = parse_seed(seed)

        notes = [f"Seed: {seed}"]
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            if text and count_tokens(tokenizer, text) > tokenizer.model_max_length:
                message = (
                    f"The {name} is longer than CLIP's {tokenizer.model_max_length} tokens;"
                    " only its beginning was used."
                )
                gr.Warning(message)
                notes.append(message)

        # A pipeline of our own per request: it shares the weights, but the scheduler holds per-run state.
        components = {**pipeline.components, "scheduler": SCHEDULERS[scheduler](pipeline.scheduler.config)}
        run = StableDiffusionPipeline(**components, requires_safety_checker=pipeline.config.requires_safety_checker)
        run.set_progress_bar_config(disable=True)
        generator = torch.Generator("cpu" if device.type == "mps" else device).manual_seed(seed)
        with torch.inference_mode():
            images = run(
                prompt,
                negative_prompt=negative_prompt or None,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                width=int(width),
                height=int(height),
                num_images_per_prompt=int(num_images),
                generator=generator,
            ).images
        return images, "\n".join(notes)

    return generate


def build_app(pipeline, *, title=TITLE, description=DESCRIPTION, examples=EXAMPLES, concurrency=1, cache_max_age=3600):
    """The demo's gr.Blocks for a loaded pipeline. Nothing is launched."""
    default_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    generate = make_generate(pipeline)

    # Gradio keeps every image it serves as a file in its cache; delete_cache bounds how long they stay.
    delete_cache = (min(cache_max_age, 600), cache_max_age)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=delete_cache) as app:
        gr.Markdown(f"# {title}\n{description}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder="yoda", lines=2)
                negative_prompt = gr.Textbox(label="Negative prompt", value="", placeholder="blurry, low quality")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                    guidance_scale = gr.Slider(0, MAX_GUIDANCE, value=7.5, step=0.5, label="Guidance scale")
                with gr.Row():
                    seed = gr.Textbox(label="Seed (blank = random)", value="")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler")
                with gr.Row():
                    width = gr.Slider(MIN_SIZE, MAX_SIZE, value=default_size, step=8, label="Width")
                    height = gr.Slider(MIN_SIZE, MAX_SIZE, value=default_size, step=8, label="Height")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png")
                info = gr.Textbox(label="Details", interactive=False)
        gr.Examples(examples=[[e] for e in examples], inputs=[prompt])

        inputs = [prompt, negative_prompt, steps, guidance_scale, seed, scheduler, width, height, num_images]
        # The button and Enter in the prompt box share one concurrency limit; only the button is the public API.
        limit = dict(concurrency_limit=concurrency, concurrency_id="generate")
        button.click(generate, inputs, [gallery, info], api_name="generate", **limit)
        prompt.submit(generate, inputs, [gallery, info], api_visibility="private", **limit)
    return app


def launch(args, block=True):
    """Load the model, build the app and serve it as args say; returns the running app when block=False."""
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    pipeline = load_pipeline(args.model_path, device, dtype, config=args.model_config, lora=args.lora)
    app = build_app(pipeline, concurrency=args.concurrency, cache_max_age=args.cache_max_age)
    app.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            show_error=True,
            prevent_thread_lock=not block,
            quiet=not block,
        )
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({err}); choose another --port") from err
    return app


def main(argv=None):
    args = parse_args(argv)
    launch(args)


if __name__ == "__main__":
    run_main(main)
