"""AUTOMATIC1111's web API (what its --api serves), which gradio_app.py serves beside its page and /v1, so that the
clients written for AUTOMATIC1111 (Open WebUI, SillyTavern, the webuiapi package, bots and scripts) can use the
fine-tuned model.

    POST /sdapi/v1/txt2img      prompt, negative_prompt, seed (-1: a random one), steps, cfg_scale, width, height,
                                sampler_name (or sampler_index) and scheduler, batch_size x n_iter images,
                                override_settings' CLIP_stop_at_last_layers (the clip skip of this request),
                                rescale_cfg (the guidance rescale, 0 to 1, as the Forge web UIs name it; left
                                out, the model's own: 0.7 for a model that samples with zero terminal SNR)
    POST /sdapi/v1/img2img      the same, with init_images (one base64 image) redrawn to denoising_strength, and
                                an optional mask (base64, white where to redraw; black with inpainting_mask_invert=1),
                                blurred by mask_blur pixels
    GET  /sdapi/v1/progress     how far the oldest running /sdapi/v1 request has got, and how many wait
    POST /sdapi/v1/interrupt    stop the running /sdapi/v1 requests after their current step (the page's and /v1's
                                go on); each answers with its images as they stood, "Interrupted at step" in them
    POST /sdapi/v1/png-info     an image's generation parameters (a PNG's text chunk, a JPEG's or WebP's EXIF
                                comment): its text and AUTOMATIC1111's fields
    POST /sdapi/v1/refresh-loras   read --lora_dir again: files added since become tags, removed ones stop being
    GET  /sdapi/v1/sd-models    the one model served; GET /sdapi/v1/options its settings (POST may only name it)
    GET  /sdapi/v1/samplers, schedulers, loras, embeddings, scripts, upscalers, latent-upscale-modes, sd-vae,
         prompt-styles

Answers have AUTOMATIC1111's shape, {"images": [base64 PNG, ...], "parameters": {the request}, "info": "<JSON>"},
and each PNG carries its parameters as AUTOMATIC1111 writes them. Requests go through the same ImageService and
RequestQueue as the page and /v1 (see sdtoolkit/serving.py), so a seed gives the same pixels here and there.

AUTOMATIC1111's clients send every field of its request, most at their defaults. A field that would change the
image and that this server can't honour (the hires fix, face restoration, tiling, variation seeds, styles,
scripts, other resize modes) is a 400 when switched on, not silently dropped. Fields that change nothing here (saving
and sending options, the hires fields while it is off) are ignored, and so are fields AUTOMATIC1111 does not know,
as it ignores them. Errors are {"error", "detail"}: 400 names the field at fault, 401 wants a login, 503 (with
Retry-After) means the queue is full.

Auth, when gradio_app.py has --auth or --api_key: HTTP Basic with --auth's user:password (AUTOMATIC1111's --api-auth,
what its clients send), or with the API key as the password, or `Authorization: Bearer <key>` as /v1 takes it.
"""

import base64
import binascii
import io
import json
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool

from sdtoolkit.errors import first_line
from sdtoolkit.images_api import MAX_UPLOAD_BYTES, BadRequest, generate_while_connected, png_bytes
from sdtoolkit.serving import (
    A1111_SAMPLERS,
    MAX_GUIDANCE,
    MAX_IMAGES,
    MAX_SEED,
    MAX_SIZE,
    MAX_STEPS,
    MIN_SIZE,
    QueueFull,
    RequestRefused,
    image_seeds,
    random_seed,
    read_parameters,
    scheduler_named,
)

# AUTOMATIC1111's API defaults, for the fields a request leaves out.
DEFAULTS = {"steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "sampler_name": "Euler", "batch_size": 1,
            "n_iter": 1, "denoising_strength": 0.75, "mask_blur": 4}  # fmt: skip
# Fields that change the image and that this server can't honour: refused unless at the value that turns them off.
OFF = {
    "enable_hr": False, "restore_faces": False, "tiling": False, "subseed_strength": 0, "styles": [],
    "script_name": None, "script_args": [], "alwayson_scripts": {}, "refiner_checkpoint": None, "s_churn": 0,
    "s_noise": 1, "seed_resize_from_h": 0, "seed_resize_from_w": 0, "resize_mode": 0,
}  # fmt: skip
# Schedule types (AUTOMATIC1111 1.9's `scheduler` field): which of our samplers each turns a sampler into.
# "Automatic" is the sampler's own default, Karras for DPM++ 2M and the plain schedule for the others.
SCHEDULES = ("automatic", "uniform", "karras")


def is_off(value, off):
    """Whether a request's value leaves an unsupported feature off: its off value, or null, empty or zero."""
    if value is None or value == off:
        return True
    if off in (None, [], {}):
        return value in ("", [], {}, "None")
    if off == 0 and value in (-1, 0):  # -1 is AUTOMATIC1111's "not set" for sizes
        return True
    return False


def number(body, name, low, high, *, whole=False):
    """body[name] checked, or its AUTOMATIC1111 default when it is left out or null."""
    value = body.get(name)
    value = DEFAULTS.get(name) if value is None else value
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise BadRequest(f"'{name}' must be a {'whole number' if whole else 'number'}, got {value!r}", name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be from {low:g} to {high:g}, got {value}", name)
    return value


def sampler_for(sampler_name, schedule):
    """Our SCHEDULERS key for AUTOMATIC1111's sampler name and schedule type; BadRequest naming what works."""
    schedule = (schedule or "automatic").strip().lower()
    if schedule not in SCHEDULES:
        raise BadRequest(
            f"unknown 'scheduler' {schedule!r}; this server has Automatic, Uniform and Karras", "scheduler"
        )
    name = str(sampler_name).strip()
    plain, karras = scheduler_named(name), scheduler_named(f"{name} Karras")
    if plain is not None and plain.endswith("Karras"):  # an old combined name, "DPM++ 2M Karras"
        return plain
    if schedule == "karras" or (schedule == "automatic" and name.lower() == "dpm++ 2m"):
        if karras is None:
            raise BadRequest(f"'sampler_name' {name!r} has no Karras schedule here", "scheduler")
        return karras
    if plain is None and karras is not None:
        raise BadRequest(f"'sampler_name' {name!r} has only a Karras schedule here: send 'scheduler': 'Karras'",
                         "scheduler")  # fmt: skip
    if plain is None:
        names = ", ".join(A1111_SAMPLERS.values())
        raise BadRequest(f"unknown 'sampler_name' {name!r}; this server has {names}", "sampler_name")
    return plain


def decode_image(value, name):
    """A base64 image (a data: URL too) as a PIL image, EXIF orientation applied; BadRequest if it is not one."""
    if not isinstance(value, str):
        raise BadRequest(f"'{name}' must be a base64 image", name)
    data = value.split(",", 1)[1] if value.startswith("data:") else value
    try:
        raw = base64.b64decode(data, validate=False)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"'{name}' is not base64 ({first_line(err)})", name) from err
    if len(raw) > MAX_UPLOAD_BYTES:
        raise BadRequest(f"'{name}' is larger than {MAX_UPLOAD_BYTES // 1024**2} MB", name)
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise BadRequest(f"'{name}' is not an image this server can read ({first_line(err)})", name) from err
    return ImageOps.exif_transpose(image)


def exif_comment(image):
    """The EXIF UserComment of a JPEG or WebP, where AUTOMATIC1111 writes their parameters (piexif's "UNICODE"
    comment: UTF-16, big-endian), as text; None without one."""
    comment = image.getexif().get_ifd(0x8769).get(0x9286)  # the Exif IFD's UserComment
    if not isinstance(comment, bytes):
        return comment or None
    prefix, body = comment[:8], comment[8:]
    if prefix == b"UNICODE\0":
        return body.decode("utf-16-be", errors="replace")
    if prefix in (b"ASCII\0\0\0", b"\0" * 8):
        return body.decode("utf-8", errors="replace").rstrip("\0")
    return comment.decode("utf-8", errors="replace")


def parse_request(body, service, *, edit=False):
    """(ImageService.generate arguments, facts for the answer's info) of a txt2img or img2img body."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    for name, off in OFF.items():
        if name in body and not is_off(body[name], off):
            raise BadRequest(f"'{name}' is not supported by this server; leave it at {json.dumps(off)}", name)
    prompt, negative_prompt = body.get("prompt") or "", body.get("negative_prompt") or ""
    for name, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise BadRequest(f"'{name}' must be a string", name)
    # Syntax and <lora:name:weight> tags: each field checked on its own, so that the 400 names the one at fault.
    for field, text, negative in (("prompt", prompt, ""), ("negative_prompt", "", negative_prompt)):
        try:
            service.check_prompt(text, negative)
        except ValueError as err:
            raise BadRequest(str(err), field) from None
    seed = body.get("seed", -1)
    if seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and seed < 0):
        seed = random_seed()
    else:
        seed = number(body, "seed", 0, MAX_SEED, whole=True)
    size = {}
    for side in ("width", "height"):
        size[side] = number(body, side, MIN_SIZE, MAX_SIZE, whole=True)
        if size[side] % 8:
            raise BadRequest(f"'{side}' must be a multiple of 8 (the VAE works on 8x8 pixel blocks)", side)
    batch_size, n_iter = (number(body, name, 1, MAX_IMAGES, whole=True) for name in ("batch_size", "n_iter"))
    if batch_size * n_iter > MAX_IMAGES:
        raise BadRequest(f"'batch_size' x 'n_iter' is {batch_size * n_iter}; this server makes at most {MAX_IMAGES}"
                         " images a request", "n_iter")  # fmt: skip
    sampler = body.get("sampler_name") or body.get("sampler_index") or DEFAULTS["sampler_name"]
    scheduler = sampler_for(sampler, body.get("scheduler"))
    # The clip skip of this request: AUTOMATIC1111's clients set it in override_settings.
    clip_skip = service.clip_skip
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise BadRequest("'override_settings' must be an object", "override_settings")
    for key, value in overrides.items():
        if key == "CLIP_stop_at_last_layers":
            layers = service.pipeline.text_encoder.config.num_hidden_layers
            clip_skip = number(overrides, key, 1, layers, whole=True)
        elif key == "sd_model_checkpoint":
            if value not in (service.model_id, service.model_name):
                raise BadRequest(f"the model {value!r} is not served here; this server serves"
                                 f" {service.model_id!r}", "override_settings")  # fmt: skip
        else:
            raise BadRequest(f"'override_settings' {key!r} can't be changed per request here; only"
                             " CLIP_stop_at_last_layers and sd_model_checkpoint can", "override_settings")  # fmt: skip
    arguments = dict(
        prompt=prompt,
        negative_prompt=negative_prompt,
        steps=number(body, "steps", 1, MAX_STEPS, whole=True),
        guidance_scale=float(number(body, "cfg_scale", 0, MAX_GUIDANCE)),
        seed=seed,
        scheduler=scheduler,
        num_images=batch_size * n_iter,
        clip_skip=clip_skip,
        **size,
    )
    if body.get("rescale_cfg") is not None:
        arguments["guidance_rescale"] = float(number(body, "rescale_cfg", 0, 1))
    if edit:
        if arguments.get("guidance_rescale"):
            raise BadRequest("'rescale_cfg' is for txt2img: diffusers' image to image and inpainting have none",
                             "rescale_cfg")  # fmt: skip
        arguments.update(parse_edit(body, arguments))
    facts = {"batch_size": batch_size, "sampler_name": A1111_SAMPLERS[scheduler], "clip_skip": clip_skip}
    return arguments, facts


def parse_edit(body, arguments):
    """An img2img request's image, mask and strength, as ImageService.generate takes them."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise BadRequest("'init_images' must be a list of one base64 image", "init_images")
    size = (arguments["width"], arguments["height"])
    image = decode_image(images[0], "init_images").convert("RGB").resize(size, Image.LANCZOS)
    strength = number(body, "denoising_strength", 0, 1)
    if int(arguments["steps"] * strength) < 1:  # the steps that run are the last `strength` of the schedule
        raise BadRequest(f"'denoising_strength' {strength:g} of {arguments['steps']} 'steps' runs no step; raise"
                         " either", "denoising_strength")  # fmt: skip
    mask = None
    if body.get("mask"):
        # White is what may change, as diffusers takes it; inpainting_mask_invert=1 swaps them, as in AUTOMATIC1111.
        mask = decode_image(body["mask"], "mask").convert("L").resize(size, Image.NEAREST)
        if body.get("inpainting_mask_invert"):
            mask = ImageOps.invert(mask)
        blur = number(body, "mask_blur", 0, 64)
        if blur:
            mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return {"image": image, "mask": mask, "strength": float(strength)}


def error(status, message, *, headers=None):
    return JSONResponse({"error": "Bad Request" if status == 400 else "Error", "detail": message},
                        status_code=status, headers=headers)  # fmt: skip


def a1111_api(service, *, auth=None, api_key=None):
    """The routes above for `service`, as a FastAPI router. auth: (user, password) of --auth, or None; api_key:
    /v1's key, or None. With either, every route wants one of them (see the module's docstring)."""
    router = APIRouter(prefix="/sdapi/v1")

    def refused(request):
        """A 401 if the request lacks a login or key, else None."""
        if auth is None and api_key is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and api_key is not None and secrets.compare_digest(token, api_key):
            return None
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(token).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                user = password = ""
            logins = [auth] if auth else []
            if api_key is not None:
                logins.append((user, api_key))  # the key as the password, with any user name
            if any(secrets.compare_digest(f"{user}:{password}", f"{u}:{p}") for u, p in logins):
                return None
        return error(401, "a login is needed: HTTP Basic with the server's --auth user:password (or its API key as"
                          " the password)", headers={"WWW-Authenticate": "Basic"})  # fmt: skip

    async def read_body(request):
        """(the request's JSON body, None), or (None, the response that turns it away: no login, or not JSON)."""
        denied = refused(request)
        if denied:
            return None, denied
        try:
            return await request.json(), None
        except ValueError:
            return None, error(400, "the request body is not valid JSON")

    async def generate(request, *, edit):
        body, turned_away = await read_body(request)
        if turned_away:
            return turned_away
        try:
            arguments, facts = parse_request(body, service, edit=edit)
        except BadRequest as err:
            return error(400, str(err))

        # An "sdapi" Generation: /progress follows it, /interrupt stops it, and so does the client hanging up.
        try:
            images = await generate_while_connected(request, service, arguments, source="sdapi")
        except QueueFull as err:
            return error(503, str(err), headers={"Retry-After": str(err.retry_after)})
        except RequestRefused as err:
            return error(400, str(err))
        except Exception as err:  # a failed generation (out of memory, ...) must not look like a success
            return error(500, f"generation failed: {first_line(err)}")
        seeds = image_seeds(arguments["seed"], len(images))
        count = len(images)
        info = {
            "prompt": arguments["prompt"], "all_prompts": [arguments["prompt"]] * count,
            "negative_prompt": arguments["negative_prompt"],
            "all_negative_prompts": [arguments["negative_prompt"]] * count,
            "seed": seeds[0], "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * count, "subseed_strength": 0,
            "width": arguments["width"], "height": arguments["height"], "sampler_name": facts["sampler_name"],
            "cfg_scale": arguments["guidance_scale"], "steps": arguments["steps"], "batch_size": facts["batch_size"],
            "restore_faces": False, "sd_model_name": service.model_id, "sd_model_hash": None,
            "denoising_strength": arguments.get("strength"), "clip_skip": facts["clip_skip"], "styles": [],
            "infotexts": [image.info["parameters"] for image in images], "index_of_first_image": 0,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "extra_generation_params": {},
            "is_using_inpainting_conditioning": False, "version": "sdtoolkit",
        }  # fmt: skip
        send = body.get("send_images", True) is not False
        pngs = [base64.b64encode(png_bytes(image)).decode("ascii") for image in images] if send else []
        # AUTOMATIC1111 answers with the request's own fields as "parameters"; the images are too large to repeat.
        parameters = {key: value for key, value in body.items() if key not in ("init_images", "mask")}
        return {"images": pngs, "parameters": parameters, "info": json.dumps(info)}

    @router.post("/txt2img")
    async def txt2img(request: Request):
        return await generate(request, edit=False)

    @router.post("/img2img")
    async def img2img(request: Request):
        return await generate(request, edit=True)

    @router.get("/progress")
    def progress(request: Request):
        """AUTOMATIC1111's progress: the oldest running /sdapi/v1 request's share of its steps done and the seconds
        it has left, and in "job_count" the /sdapi/v1 requests running or waiting (0: none, the server is free for
        its clients). No live preview: "current_image" is null, as AUTOMATIC1111's is with previews off."""
        denied = refused(request)
        if denied:
            return denied
        queued = service.in_queue("sdapi")
        running = queued[0] if queued and queued[0].started is not None else None
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                 "job_count": len(queued), "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                 "sampling_steps": 0}  # fmt: skip
        done = eta = 0.0
        if running is not None:
            done = running.step / max(running.steps, 1)
            seconds = time.time() - running.started
            eta = seconds / done - seconds if done else 0.0
            state.update(interrupted=running.stop.is_set(), job="sdtoolkit", sampling_step=running.step,
                         sampling_steps=running.steps,
                         job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(running.started)))  # fmt: skip
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    @router.post("/interrupt")
    def interrupt(request: Request):
        """Stop the running /sdapi/v1 requests, as AUTOMATIC1111's Interrupt stops its current job; the waiting ones
        and other front-ends' requests go on."""
        denied = refused(request)
        if denied:
            return denied
        service.stop("sdapi")
        return {}

    @router.post("/png-info")
    async def png_info(request: Request):
        """An image's parameters text (the PNG text chunk this server and AUTOMATIC1111 write, or the EXIF comment
        AUTOMATIC1111 writes in a JPEG or WebP) as AUTOMATIC1111 answers: {"info": the text, "items": the image's
        other text chunks, "parameters": its fields}."""
        body, turned_away = await read_body(request)
        if turned_away:
            return turned_away
        try:
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            image = decode_image(body.get("image"), "image")
        except BadRequest as err:
            return error(400, str(err))
        text = image.info.get("parameters") or exif_comment(image) or ""
        items = {key: value for key, value in image.info.items() if isinstance(value, str) and key != "parameters"}
        return {"info": text, "items": items, "parameters": read_parameters(text)}

    @router.post("/refresh-loras")
    async def refresh_loras(request: Request):
        """Read --lora_dir again, as AUTOMATIC1111's refresh does: new files become tags, removed ones stop being.
        It waits for the running requests (the LoRA layers can't change under them). Answers what changed."""
        denied = refused(request)
        if denied:
            return denied
        try:
            added, removed, skipped = await run_in_threadpool(service.refresh_loras)
        except ValueError as err:
            return error(400, str(err))
        return {"loras": sorted(service.loras), "added": added, "removed": removed, "skipped": dict(skipped)}

    @router.get("/sd-models")
    def sd_models(request: Request):
        return refused(request) or [
            {"title": service.model_id, "model_name": service.model_id, "hash": None, "sha256": None,
             "filename": service.model_name, "config": None}
        ]  # fmt: skip

    def options_now():
        return {"sd_model_checkpoint": service.model_id, "CLIP_stop_at_last_layers": service.clip_skip,
                "samples_format": "png", "sd_checkpoint_hash": None}  # fmt: skip

    @router.get("/options")
    def options(request: Request):
        return refused(request) or options_now()

    @router.post("/options")
    async def set_options(request: Request):
        """Clients pick the model here: the served one is accepted, anything else can't be set on this server."""
        body, turned_away = await read_body(request)
        if turned_away:
            return turned_away
        now = options_now()
        for key, value in body.items() if isinstance(body, dict) else [(None, body)]:
            if key in now and value == now[key]:  # the served model, the clip skip it serves with, ...
                continue
            setting = f"{key}={value!r}" if key else "that body"
            return error(400, f"{setting} can't be set here: this server's model and settings are chosen when it"
                              " starts (gradio_app.py --model_path, --clip_skip)")  # fmt: skip
        return True

    @router.get("/samplers")
    def samplers(request: Request):
        return refused(request) or [
            {"name": theirs, "aliases": [ours], "options": {}} for ours, theirs in A1111_SAMPLERS.items()
        ]

    @router.get("/schedulers")
    def schedulers(request: Request):
        return refused(request) or [
            {"name": name, "label": name.capitalize(), "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
             "need_inner_model": False} for name in SCHEDULES
        ]  # fmt: skip

    @router.get("/loras")
    def loras(request: Request):
        return refused(request) or [
            {"name": name, "alias": name, "path": None, "metadata": {}} for name in sorted(service.loras)
        ]

    @router.get("/embeddings")
    def embeddings(request: Request):
        return refused(request) or {"loaded": {name: {} for name in service.embeddings}, "skipped": {}}

    @router.get("/scripts")
    def scripts(request: Request):
        return refused(request) or {"txt2img": [], "img2img": []}

    def none_here(request: Request):
        return refused(request) or []

    # What this server has none of, answered as AUTOMATIC1111 answers when it has none.
    for path in ("/upscalers", "/latent-upscale-modes", "/sd-vae", "/prompt-styles"):
        router.add_api_route(path, none_here, methods=["GET"])

    # Anything else under /sdapi/v1 is an AUTOMATIC1111 endpoint this server does not have; say so.
    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def not_here(path: str, request: Request):
        return refused(request) or error(404, f"{request.method} /sdapi/v1/{path} is not served here: only txt2img,"
                                              " img2img, progress, interrupt, png-info, refresh-loras, sd-models,"
                                              " options, samplers, schedulers, loras, embeddings, scripts,"
                                              " upscalers, latent-upscale-modes, sd-vae and prompt-styles")  # fmt: skip

    return router
