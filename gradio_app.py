#!/usr/bin/env python
"""Serve a fine-tuned Stable Diffusion pipeline: a web page for people, Gradio's `/generate` for gradio_client,
and an OpenAI-compatible images API for everything else (see docs/serving.md).

    python gradio_app.py                                   # sd-pokemon-model on http://127.0.0.1:7860
    python gradio_app.py --model_path demo/sd-demo-model   # the model `make demo` trained
    python gradio_app.py --listen --auth me:secret         # reachable from other devices, behind a login
    python gradio_app.py --share                           # a temporary public *.gradio.live link

All three share one model and one bounded queue (sdtoolkit/serving.py) that runs `--concurrency` requests at
a time, so a few users at once can't knock the GPU over; the /v1 routes are in sdtoolkit/images_api.py.
"""

import os
import socket
from contextlib import asynccontextmanager
from pathlib import Path

import gradio as gr
import psutil
from huggingface_hub import ModelCard
from PIL import Image

from sdtoolkit.a1111_api import a1111_api
from sdtoolkit.embeddings import load_embeddings
from sdtoolkit.errors import ArgumentParser, UserError, run_main
from sdtoolkit.images_api import ImageFiles, images_api
from sdtoolkit.inference import (
    add_device_arguments,
    add_lora_scale_argument,
    add_model_config_argument,
    is_lora,
    load_lora_dir,
    load_pipeline,
    looks_like_local_path,
    pick_clip_skip,
    pick_device_and_dtype,
    quiet_diffusers_noise,
)
from sdtoolkit.serving import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_LORA_SCALE,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    SCHEDULERS,
    Generation,
    ImageService,
    QueueFull,
    RequestQueue,
    RequestRefused,
    random_seed,
)

SEED_HELP = (
    "Leave the seed blank for a random one; the seed used is shown under the images, and every PNG carries its"
    " prompt, seed and settings, so a picture can be made again."
)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# AUTOMATIC1111's launch flags (and the training script's model flag), and what does their work here: an error
# that names one of them says so.
KNOWN_ELSEWHERE = {
    "--ckpt": "--model_path here (one .safetensors file, a pipeline folder or a hub id)",
    "--pretrained_model_name_or_path": "--model_path here (a training run's folder, one .safetensors file, a hub id)",
    "--api": "not needed here: AUTOMATIC1111's API (/sdapi/v1) is always served, protected by --auth or --api_key",
    "--nowebui": "not here: the page is served beside the APIs (--auth protects both)",
    "--gradio-auth": "--auth here (user:password)",
    "--api-auth": "--auth here: /sdapi/v1 asks for its user:password, as AUTOMATIC1111 does with that flag",
    "--server-name": "--host here (--listen for every interface)",
    "--vae-path": "not here: a model is served with the VAE its training run recorded (--model_path a run's folder)",
    "--no-half": "--dtype float32 here",
    "--precision": "--dtype here (float16, bfloat16 or float32)",
    "--device-id": "--device here (cuda:1, ...)",
}
# How the model card training writes names the base model and the data, for a full fine-tune and for a LoRA.
FINE_TUNED_FROM = ("This pipeline was fine-tuned from", "This LoRA adapter was fine-tuned from")


def parse_args(argv=None):
    parser = ArgumentParser(
        description="Serve a Stable Diffusion pipeline as a web page, a Gradio API and an OpenAI-compatible API.",
        known_elsewhere=KNOWN_ELSEWHERE,
    )
    parser.add_argument(
        "--model_path", default="sd-pokemon-model", help="Pipeline folder, hub id, or SD 1.x .safetensors file."
    )
    parser.add_argument(
        "--lora",
        default=None,
        help="A LoRA to load on top of --model_path (folder or .safetensors file; LyCORIS's LoHa and LoKr too).",
    )
    add_lora_scale_argument(parser)
    parser.add_argument(
        "--clip_skip",
        type=int,
        default=None,
        help=(
            "Read prompts from the text encoder's N-th layer from the end, as AUTOMATIC1111's Clip skip setting: 2 for"
            " models made for it (NovelAI's and most anime models). Default: the one the model or LoRA was trained"
            " with, when its run recorded it (train_text_to_image.py --clip_skip runs and kohya-ss LoRAs do), else 1."
        ),
    )
    parser.add_argument(
        "--guidance_rescale",
        type=float,
        default=None,
        help=(
            "The page's and APIs' default guidance rescale for text to image, 0 to 1 (the Forge web UIs' Rescale"
            " CFG; requests may set their own). Default: the model's own, 0.7 for a model that samples with zero"
            " terminal SNR (a --zero_terminal_snr run), else 0."
        ),
    )
    parser.add_argument(
        "--lora_dir",
        default=None,
        help=(
            "A folder of LoRA files (.safetensors, searched recursively; LyCORIS's LoHa and LoKr too), as"
            " AUTOMATIC1111's models/Lora: a prompt applies one with <lora:name:weight>, name being its file's name."
        ),
    )
    parser.add_argument(
        "--embeddings_dir",
        default=None,
        help=(
            "A folder of textual inversion embeddings (.safetensors, searched recursively), as AUTOMATIC1111's"
            " embeddings/ folder: each file's name becomes a word of the prompt (EasyNegative.safetensors:"
            " EasyNegative). Pickle files are skipped."
        ),
    )
    add_model_config_argument(parser)
    add_device_arguments(parser)
    parser.add_argument(
        "--title", default=None, help="The page's title (default: the model's name; its card gives the text)."
    )

    # Who can reach it.
    parser.add_argument("--host", default=None, help="Interface to listen on (default 127.0.0.1: this machine only).")
    parser.add_argument(
        "--listen", action="store_true", help="Listen on every interface (0.0.0.0) and print the LAN addresses."
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="Also open a temporary public Gradio link.")
    parser.add_argument("--auth", default=None, help="user:password to require a login on the page.")
    parser.add_argument(
        "--api_key",
        default=os.environ.get("SDTOOLKIT_API_KEY"),
        help=(
            "The Bearer token /v1 wants (default: $SDTOOLKIT_API_KEY, which other users of the machine can't read"
            " in `ps`). Without it, --auth's user:password is the token; with neither, /v1 is open."
        ),
    )

    # How much work it takes on (the page and /v1 share one queue).
    parser.add_argument("--max_queue", type=int, default=16, help="Requests that may wait; more are refused.")
    parser.add_argument("--concurrency", type=int, default=1, help="Requests generated at the same time.")
    parser.add_argument(
        "--cache_max_age",
        type=int,
        default=3600,
        help=(
            "Seconds an image the page served stays in Gradio's file cache (GRADIO_TEMP_DIR) before it is"
            " deleted, checked every min(age, 10 minutes), and how long a /v1 image link works. Both are emptied"
            " when the server stops."
        ),
    )
    args = parser.parse_args(argv)

    if args.listen and args.host not in (None, "0.0.0.0"):
        raise UserError(f"--listen means --host 0.0.0.0; leave out --host {args.host} or --listen")
    args.host = "0.0.0.0" if args.listen else args.host or "127.0.0.1"
    if args.auth is not None and (":" not in args.auth or args.auth.startswith(":") or args.auth.endswith(":")):
        raise UserError("--auth must be user:password")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError("--api_key (or SDTOOLKIT_API_KEY) is empty; give a key or leave it out")
    if args.max_queue < 1 or args.concurrency < 1:
        raise UserError("--max_queue and --concurrency must be at least 1")
    if args.guidance_rescale is not None and not 0 <= args.guidance_rescale <= 1:
        raise UserError(f"--guidance_rescale must be from 0 (off) to 1, got {args.guidance_rescale}")
    if not 1 <= args.port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {args.port}")
    if args.cache_max_age < 1:
        raise UserError(f"--cache_max_age must be at least 1 second, got {args.cache_max_age}")
    if args.lora_scale != 1 and not is_lora(args.model_path, args.lora):
        raise UserError("--lora_scale is for a LoRA: give one with --lora, or a LoRA run's folder as --model_path")
    return args


def parse_seed(seed):
    """The seed box: blank means a random seed; anything else must be a whole number."""
    text = "" if seed is None else str(seed).strip()
    if text == "":
        return random_seed()
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
    if not 0 <= value <= MAX_SEED:
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


def visitor(request):
    """The Generation source of a page visitor (or gradio_client): its session, so that Stop stops only its own."""
    return f"page:{request.session_hash}" if request is not None and request.session_hash else "page"


def make_generate(service):
    """The function behind the Generate button and the /generate endpoint."""
    tokenizer = service.pipeline.tokenizer  # for its max length; its calls go through the service's lock

    def generate(
        prompt, negative_prompt, steps, guidance_scale, seed, scheduler, width, height, num_images, lora_scale=None,
        image=None, strength=DEFAULT_STRENGTH, mask=None, guidance_rescale=None, request: gr.Request = None,
        progress=gr.Progress(),
    ):  # fmt: skip
        # Gradio fills in `request` (who asks) and `progress` (the bar over the images); they are not API inputs.
        check_request(prompt, steps, width, height, num_images)
        seed = parse_seed(seed)
        # With an image, it is redrawn from `strength` of the schedule (image to image), at the size asked; with a
        # mask too, only where the mask is white (inpainting, as AUTOMATIC1111's "inpaint upload" reads a mask).
        if mask is not None and image is None:
            raise gr.Error("A mask says which part of an image to redraw: give the image too.")
        if mask is not None and mask.size != image.size:
            raise gr.Error(
                f"The mask is {mask.size[0]}x{mask.size[1]} and the image {image.size[0]}x{image.size[1]};"
                " they must be the same size."
            )
        if image is not None:
            strength = float(strength)
            if not 0 < strength <= 1:
                raise gr.Error(f"The strength must be above 0 and at most 1, not {strength:g}.")
            if int(int(steps) * strength) < 1:
                raise gr.Error(f"A strength of {strength:g} with {int(steps)} steps runs no step; raise either.")
        # The LoRA strength slider shows only when a LoRA is served; /generate's callers may leave it out.
        if not service.served:
            if lora_scale is not None and float(lora_scale) != service.lora_scale:
                raise gr.Error("This server serves no LoRA, so there is no LoRA strength to set.")
            lora_scale = None
        elif lora_scale is not None:
            lora_scale = float(lora_scale)
            if not 0 <= lora_scale <= MAX_LORA_SCALE:
                raise gr.Error(f"The LoRA strength must be from 0 to {MAX_LORA_SCALE:g}, not {lora_scale:g}.")
        # The guidance rescale is text to image's (None: the server's); an edit goes without, and says so.
        if guidance_rescale is not None:
            guidance_rescale = float(guidance_rescale)
            if not 0 <= guidance_rescale <= 1:
                raise gr.Error(f"The guidance rescale must be from 0 to 1, not {guidance_rescale:g}.")
        rescale_note = None
        if image is not None and guidance_rescale:
            rescale_note = "Guidance rescale is for text to image only: this edit ran without it."
            guidance_rescale = None
        try:  # syntax this server does not read, and the prompt's <lora:name:weight> tags
            service.check_prompt(prompt, negative_prompt)
        except ValueError as err:
            raise gr.Error(f"{err}.") from None

        notes = [f"Seed: {seed}" + (f" (image i: {seed} + i)" if int(num_images) > 1 else "")]
        for name, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            windows = service.clip_windows(text) if text else 1
            if windows > 1:
                notes.append(
                    f"The {name} was read in {windows} windows of 75 tokens, as AUTOMATIC1111 reads a prompt longer"
                    f" than CLIP's {tokenizer.model_max_length} tokens or one with BREAK."
                )
        # The bar shows the denoising steps as they are done; Stop ends the run after the step it is in.
        progress(0, desc="Waiting for a turn")
        generation = Generation(
            source=visitor(request),
            on_step=lambda step, total: progress((step, total), desc="Generating", unit="steps"),
        )
        try:
            images = service.generate(
                prompt=prompt,
                negative_prompt=negative_prompt,
                steps=int(steps),
                guidance_scale=float(guidance_scale),
                seed=seed,
                scheduler=scheduler,
                width=int(width),
                height=int(height),
                num_images=int(num_images),
                lora_scale=lora_scale,
                image=None if image is None else image.convert("RGB"),
                mask=None if mask is None else mask.convert("L").resize((int(width), int(height)), Image.NEAREST),
                strength=None if image is None else strength,
                guidance_rescale=guidance_rescale,
                generation=generation,
            )
        except (QueueFull, RequestRefused) as err:
            raise gr.Error(str(err)) from None
        if rescale_note:
            notes.append(rescale_note)
        if generation.stopped_at == 0:
            notes.append("Stopped before it started.")
        elif generation.stopped_at is not None:
            notes.append(
                f"Stopped at step {generation.stopped_at} of {generation.steps}: the images are as they stood, not"
                " finished."
            )
        return images, "\n".join(notes)

    return generate


def make_stop(service):
    """The function behind the Stop button and the /stop endpoint: the caller's own generations, running or
    waiting, stop after their current step."""

    def stop(request: gr.Request = None):
        service.stop(visitor(request), waiting=True)

    return stop


def model_name(path):
    """A short name for a model: a folder's or a file's name (a checkpoint's with its run's: run/checkpoint-N), or
    a hub id as it is."""
    if not looks_like_local_path(path):
        return path
    path = Path(path)
    if path.suffix == ".safetensors":
        return path.stem
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name.startswith("checkpoint-") else path.name


def read_card(path):
    """The model card training wrote beside a model or LoRA (README.md), or its run's for a checkpoint, or None.
    Hub cards are not fetched."""
    folder = Path(path).parent if Path(path).is_file() else Path(path)
    card = folder / "README.md"
    if not card.is_file() and folder.name.startswith("checkpoint-"):
        card = folder.parent / "README.md"
    if not card.is_file():
        return None
    try:
        return ModelCard.load(card, ignore_metadata_errors=True)
    except (OSError, ValueError):
        return None


def describe_model(model_path, lora=None, title=None):
    """The page's title, description and example prompts, from the model card: its base model and data (the
    hub ids in its metadata, else the sentence naming local folders) and its validation prompts."""
    name = model_name(model_path) + (f" + {model_name(lora)}" if lora else "")
    description, examples = f"Stable Diffusion pipeline `{name}`.", []
    card = read_card(lora) if lora else None
    card = card or read_card(model_path)
    if card is not None:
        data = card.data.to_dict()
        datasets = data.get("datasets") or []
        datasets = [datasets] if isinstance(datasets, str) else datasets
        if data.get("base_model") and datasets:
            description = f"Fine-tuned from **{data['base_model']}** on **{', '.join(datasets)}**."
        else:
            said = [line for line in card.text.splitlines() if line.startswith(FINE_TUNED_FROM)]
            description = said[0] if said else description
        examples = [entry["text"] for entry in data.get("widget") or [] if isinstance(entry, dict) and "text" in entry]
    return title or name, f"{description} {SEED_HELP}", examples


def build_app(service, *, title, description, examples=(), cache_max_age=3600):
    """The demo's gr.Blocks for an ImageService. Nothing is launched."""
    generate, stop = make_generate(service), make_stop(service)

    # Gradio keeps every image it serves as a file in its cache; delete_cache bounds how long they stay.
    delete_cache = (min(cache_max_age, 600), cache_max_age)
    with gr.Blocks(title=title, analytics_enabled=False, delete_cache=delete_cache) as app:
        gr.Markdown(f"# {title}\n{description}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder=examples[0] if examples else "", lines=2)
                negative_prompt = gr.Textbox(label="Negative prompt", value="", placeholder="blurry, low quality")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Steps")
                    guidance_scale = gr.Slider(
                        0, MAX_GUIDANCE, value=DEFAULT_GUIDANCE, step=0.5, label="Guidance scale"
                    )
                    # Lin et al.'s rescale: the model's own by default (0.7 for a zero terminal SNR model).
                    guidance_rescale = gr.Slider(
                        0, 1, value=service.guidance_rescale, step=0.05, label="Guidance rescale (0: off)"
                    )
                with gr.Row():
                    seed = gr.Textbox(label="Seed (blank = random)", value="")
                    scheduler = gr.Dropdown(list(SCHEDULERS), value=DEFAULT_SCHEDULER, label="Scheduler")
                with gr.Row():
                    size = service.default_size
                    width = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=8, label="Width")
                    height = gr.Slider(MIN_SIZE, MAX_SIZE, value=size, step=8, label="Height")
                    num_images = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="Images")
                # 0 is the base model alone, 1 the LoRA as trained (AUTOMATIC1111's <lora:NAME:strength>).
                lora_scale = gr.Slider(
                    0, MAX_LORA_SCALE, value=service.lora_scale, step=0.05, label="LoRA strength",
                    visible=bool(service.served),
                )  # fmt: skip
                # Image to image: the image is redrawn under the prompt, from `strength` of the way to noise; with a
                # mask, only its white part (inpainting).
                with gr.Accordion("Start from an image (optional)", open=False):
                    with gr.Row():
                        image = gr.Image(label="Image", type="pil", sources=["upload", "clipboard"])
                        mask = gr.Image(
                            label="Mask (optional): white where to redraw, black where to keep", type="pil",
                            sources=["upload", "clipboard"],
                        )  # fmt: skip
                    strength = gr.Slider(
                        0.05, 1, value=DEFAULT_STRENGTH, step=0.05, label="Strength (how much of it is redrawn)"
                    )
                with gr.Row():
                    button = gr.Button("Generate", variant="primary", scale=3)
                    stop_button = gr.Button("Stop", variant="stop", scale=1)
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png")
                info = gr.Textbox(label="Details", interactive=False)
        if examples:
            gr.Examples(examples=[[e] for e in examples], inputs=[prompt])

        inputs = [prompt, negative_prompt, steps, guidance_scale, seed, scheduler, width, height, num_images,
                  lora_scale, image, strength, mask, guidance_rescale]  # fmt: skip
        # The button and Enter in the prompt box run at once: the service's RequestQueue, which /v1 shares, is
        # what makes requests wait (`concurrency` at a time) or refuses them. The public API is the two buttons:
        # /generate, and /stop for the caller's own generations.
        button.click(generate, inputs, [gallery, info], api_name="generate", concurrency_limit=None)
        prompt.submit(generate, inputs, [gallery, info], api_visibility="private", concurrency_limit=None)
        stop_button.click(stop, None, None, api_name="stop", concurrency_limit=None)
        # (Not app.unload(stop), which would stop a closed tab's requests: with an unload handler, Gradio 6.31 takes
        # over its 5 s limit to shut down while a client is connected, and its cache is left behind.)
    return app


def lan_addresses():
    """This machine's IPv4 addresses other devices may reach it at (loopback left out)."""
    found = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.append(address.address)
    return found


def warn_if_open(args):
    """Say so when the page or /v1 can be reached from elsewhere without a login or a key."""
    public = args.host not in LOCAL_HOSTS or args.share
    where = "a public link" if args.share else f"{args.host}:{args.port}"
    if public and args.auth is None:
        print(
            f"warning: the page on {where} has no login: anyone who reaches it can generate; add --auth user:password"
        )
    if public and args.api_key is None and args.auth is None:  # a share link reaches /v1 too
        print(
            f"warning: /v1 and /sdapi/v1 on {where} have no key: anyone who reaches them can generate; add --api_key"
            " or --auth"
        )


def launch(args, block=True):
    """Load the model, build the app and serve it as args say; returns the running app when block=False."""
    device, dtype = pick_device_and_dtype(args.device, args.dtype)
    pipeline = load_pipeline(
        args.model_path, device, dtype, config=args.model_config, lora=args.lora, lora_scale=args.lora_scale
    )
    layers = pipeline.text_encoder.config.num_hidden_layers
    clip_skip, source = pick_clip_skip(args.clip_skip, args.model_path, args.lora, layers)
    if clip_skip > 1:
        print(
            f"Clip skip {clip_skip} ({source}): prompts are read from the text encoder's layer {clip_skip} from the end"
        )
    # Textual inversion embeddings: new words of the tokenizer (see sdtoolkit/embeddings.py).
    embeddings = {}
    if args.embeddings_dir:
        embeddings, skipped = load_embeddings(pipeline, args.embeddings_dir)
        for file_name, reason in skipped:
            print(f"warning: --embeddings_dir: skipped {file_name}: {reason}")
        words = [f"{name} ({count} vectors)" if count > 1 else name for name, count in sorted(embeddings.items())]
        print(f"Embeddings ({len(words)}): {', '.join(words) or 'none'}")
    # LoRAs that prompts apply by name (see load_lora_dir).
    loras = {}
    if args.lora_dir:
        loras, skipped = load_lora_dir(pipeline, args.lora_dir)
        for file_name, reason in skipped:
            print(f"warning: --lora_dir: skipped {file_name}: {reason}")
        print(f"LoRAs for <lora:name:weight> ({len(loras)}): {', '.join(sorted(loras)) or 'none'}")
    queue = RequestQueue(concurrency=args.concurrency, max_queue=args.max_queue)
    lora_name = model_name(args.lora) if args.lora else None
    service = ImageService(
        pipeline,
        model_name=model_name(args.model_path),
        lora_name=lora_name,
        lora_scale=args.lora_scale,
        queue=queue,
        embeddings=sorted(embeddings),
        loras=loras,
        clip_skip=clip_skip,
        lora_dir=args.lora_dir,
        guidance_rescale=args.guidance_rescale,
    )
    if service.guidance_rescale > 0:
        print(f"Guidance rescale {service.guidance_rescale:g} for text to image (requests may set their own)")
    title, description, examples = describe_model(args.model_path, args.lora, args.title)
    app = build_app(
        service,
        title=title,
        description=description,
        examples=examples,
        cache_max_age=args.cache_max_age,
    )
    # Gradio's own queue only hands requests over; RequestQueue bounds them. Enough worker threads for every
    # request it may hold, so that none waits unseen in Gradio's thread pool.
    app.queue(max_size=None, default_concurrency_limit=None)
    max_threads = max(40, args.concurrency + args.max_queue + 8)

    # Gradio builds its FastAPI app inside launch(); the OpenAI-compatible routes join it at start-up, before
    # the first request. /v1's key: --api_key, else the page's user:password.
    api_key = args.api_key or args.auth
    # Images /v1 returns as links live beside Gradio's own cache (GRADIO_TEMP_DIR), for as long as its files do.
    files = ImageFiles(app.GRADIO_CACHE, max_age=args.cache_max_age)
    router = images_api(service, files=files, api_key=api_key)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    a1111_router = a1111_api(service, auth=auth, api_key=args.api_key)

    @asynccontextmanager
    async def add_images_api(fastapi_app):
        fastapi_app.include_router(router)
        fastapi_app.include_router(a1111_router)
        yield
        files.remove_all()

    warn_if_open(args)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            auth=auth,
            show_error=True,
            max_threads=max_threads,
            app_kwargs={"lifespan": add_images_api},
            prevent_thread_lock=True,
            quiet=True,  # Gradio's own lines speak of launch() arguments; ours below speak of this script's flags
        )
    except OSError as err:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({err}); choose another --port") from err
    print(f"Serving {service.model_id} on {app.local_url} (page and /generate), {app.local_url}v1 (OpenAI-compatible"
          f" API), {app.local_url}sdapi/v1 (AUTOMATIC1111's API), {app.local_url}health")  # fmt: skip
    if app.share_url:
        print(f"Public link (temporary, up to a week): {app.share_url}")
    if args.host == "0.0.0.0":
        for address in lan_addresses():
            print(f"From other devices: http://{address}:{args.port}/ (page), http://{address}:{args.port}/v1 (API)")
    if block:
        app.block_thread()
    return app


def main(argv=None):
    args = parse_args(argv)
    quiet_diffusers_noise()
    launch(args)


if __name__ == "__main__":
    run_main(main)
