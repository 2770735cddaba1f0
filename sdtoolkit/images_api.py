"""The OpenAI-compatible HTTP API that gradio_app.py serves beside its web page.

    POST /v1/images/generations   OpenAI's images API: prompt, n, size, response_format ("b64_json" or "url"),
                                  plus this model's own fields: negative_prompt, seed, steps, guidance_scale,
                                  guidance_rescale, scheduler, and lora_scale when a LoRA is served
    POST /v1/images/edits         the same as a multipart form, with an image to edit (image to image) and an
                                  optional mask whose transparent part is what may change (inpainting), as
                                  OpenAI's edits take them; strength: how much of it is redrawn (0 to 1)
    GET  /v1/files/NAME.png       an image a "url" response points to, for `max_age` seconds
    GET  /v1/models               the one model served
    GET  /health                  model, device, dtype, queue and uptime; no key needed, nothing generated

So any OpenAI client (the `openai` SDKs, curl, apps that take a base URL) can use the fine-tuned model. Requests
go through the same ImageService and RequestQueue as the web page (see sdtoolkit/serving.py). Errors have
OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 names the field at fault, 401 means no
valid key, 404 an unknown model, 503 (with Retry-After) a full queue.
"""

import asyncio
import base64
import io
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, ImageOps, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo
from starlette.concurrency import run_in_threadpool

from sdtoolkit.errors import first_line
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
    QueueFull,
    RequestRefused,
    image_seeds,
    random_seed,
    scheduler_named,
)

# OpenAI fields that change the result and that this server can't honour: refused, not silently ignored.
UNSUPPORTED = ("quality", "style", "background", "moderation", "output_compression", "partial_images", "stream")
KNOWN = {"prompt", "model", "n", "size", "response_format", "output_format", "user", "negative_prompt", "seed",
         "steps", "guidance_scale", "guidance_rescale", "scheduler", "lora_scale"}  # fmt: skip
# An edit's own fields; its files are `image` (or one `image[]`, as the openai SDK sends a list) and `mask`.
EDIT_FIELDS = {"strength"}
MAX_UPLOAD_BYTES = 20 * 1024**2


class BadRequest(Exception):
    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def error_response(status, message, *, param=None, type="invalid_request_error", code=None, headers=None):
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def whole_number(body, name, default, low, high):
    value = body.get(name, default)
    # JSON's true and false are ints to Python; a count or a seed is never one.
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"'{name}' must be a whole number, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def parse_size(size, default_size):
    if size in (None, "auto"):
        return default_size, default_size
    width, _, height = str(size).partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise BadRequest(f"'size' must be WIDTHxHEIGHT in pixels, like \"512x512\", got {size!r}", "size")
    width, height = int(width), int(height)
    for side in (width, height):
        if not MIN_SIZE <= side <= MAX_SIZE or side % 8:
            raise BadRequest(
                f"'size' {size}: each side must be a multiple of 8 (the VAE works on 8x8 pixel blocks) from"
                f" {MIN_SIZE} to {MAX_SIZE}",
                "size",
            )
    return width, height


def parse_generation_request(body, service, known=KNOWN):
    """The ImageService.generate arguments of a request body; BadRequest names the first field at fault."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name in body:
        if name in UNSUPPORTED:
            raise BadRequest(f"'{name}' is not supported by this server", name)
        if name not in known:
            raise BadRequest(f"unknown field '{name}'", name)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRequest("'prompt' must be a non-empty string", "prompt")
    negative_prompt = body.get("negative_prompt") or ""
    if not isinstance(negative_prompt, str):
        raise BadRequest("'negative_prompt' must be a string", "negative_prompt")
    response_format = body.get("response_format", "b64_json")
    if response_format not in ("b64_json", "url"):
        raise BadRequest(f"'response_format' must be \"b64_json\" or \"url\", got {response_format!r}",
                         "response_format")  # fmt: skip
    if body.get("output_format", "png") != "png":
        raise BadRequest("'output_format' must be \"png\" (the format that carries the parameters)", "output_format")
    scheduler = scheduler_named(str(body.get("scheduler", DEFAULT_SCHEDULER)))
    if scheduler is None:
        raise BadRequest(
            f"unknown 'scheduler' {body['scheduler']!r}; choose one of {', '.join(SCHEDULERS)}", "scheduler"
        )
    guidance = body.get("guidance_scale", DEFAULT_GUIDANCE)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise BadRequest(f"'guidance_scale' must be a number from 0 to {MAX_GUIDANCE:g}, got {guidance!r}",
                         "guidance_scale")  # fmt: skip
    rescale = body.get("guidance_rescale")
    if rescale is not None and (
        isinstance(rescale, bool) or not isinstance(rescale, (int, float)) or not 0 <= rescale <= 1
    ):
        raise BadRequest(f"'guidance_rescale' must be a number from 0 to 1, got {rescale!r}", "guidance_rescale")
    lora_scale = body.get("lora_scale")
    if lora_scale is not None and not service.served:
        raise BadRequest("'lora_scale' is for a LoRA, and this server serves none", "lora_scale")
    if lora_scale is not None and (
        isinstance(lora_scale, bool)
        or not isinstance(lora_scale, (int, float))
        or not 0 <= lora_scale <= MAX_LORA_SCALE
    ):
        raise BadRequest(f"'lora_scale' must be a number from 0 to {MAX_LORA_SCALE:g}, got {lora_scale!r}",
                         "lora_scale")  # fmt: skip
    # Syntax and <lora:name:weight> tags: each field checked on its own, so that the 400 names the one at fault.
    for field, text, negative in (("prompt", prompt, ""), ("negative_prompt", "", negative_prompt)):
        try:
            service.check_prompt(text, negative)
        except ValueError as err:
            raise BadRequest(str(err), field) from None
    seed = body.get("seed")
    width, height = parse_size(body.get("size"), service.default_size)
    return dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=whole_number(body, "steps", DEFAULT_STEPS, 1, MAX_STEPS),
        guidance_scale=float(guidance),
        seed=random_seed() if seed is None else whole_number(body, "seed", None, 0, MAX_SEED),
        scheduler=scheduler,
        width=width,
        height=height,
        num_images=whole_number(body, "n", 1, 1, MAX_IMAGES),
        lora_scale=None if lora_scale is None else float(lora_scale),
        guidance_rescale=None if rescale is None else float(rescale),
    )


def form_value(name, value):
    """A multipart form field's text as the JSON value it stands for: numbers for the numeric fields."""
    if name in ("n", "seed", "steps"):
        return int(value) if value.strip().isdigit() else value
    if name in ("guidance_scale", "guidance_rescale", "lora_scale", "strength"):
        try:
            return float(value)
        except ValueError:
            return value
    return value


async def read_upload(upload, name):
    """An uploaded image file as a PIL image (EXIF orientation applied); BadRequest if it is not one."""
    data = await upload.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise BadRequest(f"'{name}' is larger than {MAX_UPLOAD_BYTES // 1024**2} MB", name)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadRequest(f"'{name}' is not an image this server can read ({first_line(err)})", name) from err
    return ImageOps.exif_transpose(image)


def edit_size(image, default_size):
    """An edit's size when the request gives none: the image's shape, its longer side the model's default size,
    each side a multiple of 8 (at least MIN_SIZE)."""
    scale = default_size / max(image.size)
    return tuple(max(MIN_SIZE, round(side * scale / 8) * 8) for side in image.size)


async def parse_edit_request(form, service):
    """The ImageService.generate arguments of an edit's multipart form (see parse_generation_request): the image
    in RGB, and the mask as diffusers wants it, white where OpenAI's mask is transparent."""
    uploads = form.getlist("image") + form.getlist("image[]")
    if len(uploads) != 1 or isinstance(uploads[0], str):
        raise BadRequest("send one image to edit as the file 'image'", "image")
    image = (await read_upload(uploads[0], "image")).convert("RGB")
    body = {
        key: form_value(key, value) for key, value in form.multi_items() if key not in ("image", "image[]", "mask")
    }
    strength = body.pop("strength", DEFAULT_STRENGTH)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise BadRequest(f"'strength' must be a number above 0 and at most 1, got {strength!r}", "strength")
    if "size" not in body:
        body["size"] = "x".join(map(str, edit_size(image, service.default_size)))
    arguments = parse_generation_request(body, service, known=KNOWN | EDIT_FIELDS)
    if arguments["guidance_rescale"]:
        raise BadRequest("'guidance_rescale' is for generations: diffusers' image to image and inpainting have none",
                         "guidance_rescale")  # fmt: skip
    if int(arguments["steps"] * strength) < 1:  # the steps that run are the last `strength` of the schedule
        raise BadRequest(
            f"'strength' {strength:g} of {arguments['steps']} 'steps' runs no step; raise either", "strength"
        )
    mask = None
    if form.get("mask") is not None:
        if isinstance(form["mask"], str):
            raise BadRequest("'mask' must be a file: a PNG whose transparent part is what may change", "mask")
        mask = await read_upload(form["mask"], "mask")
        if mask.size != image.size:
            raise BadRequest(f"'mask' is {mask.size[0]}x{mask.size[1]}, the image {image.size[0]}x{image.size[1]};"
                             " they must be the same size", "mask")  # fmt: skip
        if "A" not in mask.getbands() and "transparency" not in mask.info:
            raise BadRequest("'mask' has no transparency: its fully transparent part is what may change", "mask")
        alpha = mask.convert("RGBA").getchannel("A")
        size = (arguments["width"], arguments["height"])
        mask = alpha.point(lambda a: 255 if a == 0 else 0).resize(size, Image.NEAREST)
        image = image.resize(size, Image.LANCZOS)
    return {**arguments, "image": image, "mask": mask, "strength": float(strength)}


def png_bytes(image):
    """The image as PNG file bytes, its parameters text chunk included."""
    info = PngInfo()
    info.add_text("parameters", image.info["parameters"])
    buffer = io.BytesIO()
    image.save(buffer, format="png", pnginfo=info)
    return buffer.getvalue()


async def generate_while_connected(request, service, arguments, *, source):
    """service.generate(**arguments) for an HTTP request, as a Generation of `source`. Generation blocks for
    seconds, so it runs in a worker thread, waiting its turn in the shared queue there. Meanwhile the connection
    is looked at every half second: if the client hangs up (its timeout, a closed app), the request is stopped,
    waiting or running, so that its turn goes to someone who will read the images."""
    generation = Generation(source=source)
    task = asyncio.ensure_future(run_in_threadpool(lambda: service.generate(**arguments, generation=generation)))
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if not task.done() and not generation.stop.is_set() and await request.is_disconnected():
            generation.stop.set()
    return task.result()  # the images, or what generate raised


class ImageFiles:
    """The PNGs of "url" responses: in a folder of their own under `parent` (made at the first one), each named
    by an unguessable token, which is what lets a browser or an <img> tag fetch it without the API key (as
    OpenAI's links do). Deleted `max_age` seconds after they were written, and all of them by `remove_all` when
    the server stops."""

    def __init__(self, parent, max_age):
        self.parent, self.max_age = Path(parent), max_age
        self.folder = None
        self.lock = threading.Lock()

    def save(self, png):
        with self.lock:
            if self.folder is None:
                self.parent.mkdir(parents=True, exist_ok=True)
                self.folder = Path(tempfile.mkdtemp(prefix="v1-images-", dir=self.parent))
        self.remove_expired()
        name = f"{secrets.token_urlsafe(24)}.png"
        (self.folder / name).write_bytes(png)
        return name

    def path(self, name):
        """The file's path, or None if there is no such file or it has expired."""
        self.remove_expired()
        path = self.folder / name if self.folder is not None and "/" not in name else None
        return path if path is not None and path.is_file() else None

    def remove_expired(self):
        if self.folder is None:
            return
        oldest = time.time() - self.max_age
        for path in self.folder.glob("*.png"):
            try:
                if path.stat().st_mtime < oldest:
                    path.unlink()
            except FileNotFoundError:  # another request removed it first
                pass

    def remove_all(self):
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def images_api(service, *, files, api_key=None):
    """The routes above for `service`, as a FastAPI router, keeping "url" images in `files` (an ImageFiles).
    With `api_key`, /v1 wants `Authorization: Bearer <api_key>`; /health stays open, so that monitors and load
    balancers need no secret, and so do the image links, whose names are their secret."""
    router = APIRouter()

    def refused(request):
        """An OpenAI-shaped 401 if the request lacks the key, else None."""
        if api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode()):
            return None
        return error_response(
            401,
            "no valid API key: send the server's key as `Authorization: Bearer <key>` (the openai SDK's api_key)",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @router.get("/health")
    def health():
        pipeline, queue = service.pipeline, service.queue
        return {
            "status": "ok",
            "model": service.model_id,
            "device": str(pipeline.device),
            "dtype": str(pipeline.unet.dtype).removeprefix("torch."),
            # A request's default lora_scale; null when no LoRA is served (and lora_scale is refused).
            "lora_scale": service.lora_scale if service.served else None,
            "loras": sorted(service.loras),  # the names <lora:name:weight> tags may use (--lora_dir)
            "clip_skip": service.clip_skip,  # the text encoder's layer prompts are read from (--clip_skip)
            "embeddings": service.embeddings,  # the words --embeddings_dir added to prompts
            "queue": {
                "running": queue.running,
                "waiting": queue.waiting,
                "concurrency": queue.concurrency,
                "max_queue": queue.max_queue,
            },
            "uptime_s": round(time.time() - service.started, 1),
        }

    @router.get("/v1/models")
    def models(request: Request):
        return refused(request) or {
            "object": "list",
            "data": [
                {"id": service.model_id, "object": "model", "created": int(service.started), "owned_by": "sdtoolkit"}
            ],
        }

    @router.post("/v1/images/generations")
    async def generations(request: Request):
        denied = refused(request)
        if denied:
            return denied
        try:
            body = await request.json()
        except ValueError:
            return error_response(400, "the request body is not valid JSON")
        try:
            arguments = parse_generation_request(body, service)
        except BadRequest as err:
            return error_response(400, str(err), param=err.param)
        return await respond(request, body, arguments)

    @router.post("/v1/images/edits")
    async def edits(request: Request):
        denied = refused(request)
        if denied:
            return denied
        try:
            # The uploads are read into images here; leaving the block deletes any that were spooled to disk.
            async with request.form() as form:
                arguments = await parse_edit_request(form, service)
                fields = {key: value for key, value in form.items() if isinstance(value, str)}
        except BadRequest as err:
            return error_response(400, str(err), param=err.param)
        except Exception as err:  # not a multipart form (or a broken one): starlette's parser says why
            return error_response(400, f"an edit is a multipart form with the file 'image' ({first_line(err)})")
        return await respond(request, fields, arguments)

    async def respond(request, body, arguments):
        """Generate for a parsed request and answer in OpenAI's shape (body: its fields, for model and
        response_format)."""
        model = body.get("model")
        if model is not None and model != service.model_id:
            return error_response(
                404, f"the model '{model}' is not served here; this server serves '{service.model_id}'",
                param="model", code="model_not_found",
            )  # fmt: skip

        try:
            images = await generate_while_connected(request, service, arguments, source="v1")
            pngs = [png_bytes(image) for image in images]
        except QueueFull as err:
            return error_response(
                503, str(err), type="server_error", code="queue_full", headers={"Retry-After": str(err.retry_after)}
            )
        except RequestRefused as err:
            return error_response(400, str(err), param=err.param)
        except Exception as err:  # a failed generation (out of memory, ...) must not look like a success
            return error_response(500, f"generation failed: {first_line(err)}", type="server_error")

        if body.get("response_format") == "url":
            # Links on the address the client used; they work for `max_age` seconds, like OpenAI's for an hour.
            data = [{"url": f"{request.base_url}v1/files/{files.save(png)}"} for png in pngs]
        else:
            data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
        for item, seed in zip(data, image_seeds(arguments["seed"], len(data))):
            item["seed"] = seed
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": "png",
            "size": f"{arguments['width']}x{arguments['height']}",
        }

    @router.get("/v1/files/{name}")
    def image_file(name: str):
        path = files.path(name)
        if path is None:
            return error_response(404, f"no image {name}: the link is wrong or older than its {files.max_age} s")
        return FileResponse(path, media_type="image/png")

    # Anything else under /v1 is an OpenAI endpoint this server does not have; say so in OpenAI's shape.
    @router.api_route("/v1/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def not_here(path: str, request: Request):
        return refused(request) or error_response(
            404,
            f"{request.method} /v1/{path} is not served here: only /v1/images/generations, /v1/images/edits and"
            " /v1/models",
        )

    return router
