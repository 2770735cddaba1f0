"""Generating images for gradio_app.py's web page and its OpenAI-compatible API: one model, one queue, and the
generation parameters inside every PNG.

Both front-ends call `ImageService.generate`, so a seed gives the same pixels whichever way it was asked for
(the API also edits an image: image to image, or inpainting inside a mask, through the same method),
and both wait in one `RequestQueue`: at most `concurrency` generations run at once, at most `max_queue` more
wait, and a request beyond that is refused at once (`QueueFull`) instead of hanging. Each request is a
`Generation` while it waits and runs: how far it has got (the page's progress bar, /sdapi/v1/progress) and a
switch that stops it after the step it is in (the page's Stop button, /sdapi/v1/interrupt).

Each image carries, in a PNG text chunk named `parameters`, the lines AUTOMATIC1111's web UI writes:

    a pikachu in a hat
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, CFG scale: 7.5, Seed: 7, Size: 512x512, Model: sd-pokemon-model

so its "PNG Info" tab, image browsers and metadata readers show how the image was made. Image i of a request
uses seed + i, so every image can be made again on its own from the seed written in it.
"""

import collections
import json
import random
import re
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

from sdtoolkit.clip_windows import encode_prompts, parse_emphasis, token_windows, unsupported_syntax
from sdtoolkit.embeddings import safetensors_files
from sdtoolkit.errors import first_line
from sdtoolkit.inference import default_guidance_rescale, load_lora_dir, supports_zero_terminal_snr

# DPM-Solver++ (https://arxiv.org/abs/2211.01095): its paper samples well in 15-25 steps; 25 is half PNDM's 50.
# "Karras": the noise levels of Karras et al. (https://arxiv.org/abs/2206.00364), closer together near the end,
# as AUTOMATIC1111's Karras samplers step; "SDE": DPM-Solver++'s stochastic form, which adds fresh noise at each
# step (drawn from each image's own generator, so a seed still gives one image).
SCHEDULERS = {
    "DPM-Solver++": lambda config: DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++"),
    "DPM-Solver++ Karras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", use_karras_sigmas=True
    ),
    "DPM-Solver++ SDE Karras": lambda config: DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True
    ),
    "PNDM": PNDMScheduler.from_config,
    "DDIM": DDIMScheduler.from_config,
    "Euler": EulerDiscreteScheduler.from_config,
    "Euler ancestral": EulerAncestralDiscreteScheduler.from_config,
    "UniPC": UniPCMultistepScheduler.from_config,
}
# AUTOMATIC1111's names for the same samplers, written into the PNGs and accepted by the API. DPM-Solver++ of
# order 2 (diffusers' default) is its "DPM++ 2M"; PNDM with SD's skip_prk_steps=True is pseudo linear multistep.
# (AUTOMATIC1111 1.9 and later write the Karras part as "Schedule type: Karras", and read these names too.)
A1111_SAMPLERS = {
    "DPM-Solver++": "DPM++ 2M",
    "DPM-Solver++ Karras": "DPM++ 2M Karras",
    "DPM-Solver++ SDE Karras": "DPM++ 2M SDE Karras",
    "PNDM": "PLMS",
    "DDIM": "DDIM",
    "Euler": "Euler",
    "Euler ancestral": "Euler a",
    "UniPC": "UniPC",
}
DEFAULT_SCHEDULER = "DPM-Solver++"
DEFAULT_STEPS = 25
DEFAULT_STRENGTH = 0.75  # an edit's: AUTOMATIC1111's default denoising strength
DEFAULT_GUIDANCE = 7.5
MAX_STEPS = 150
MAX_GUIDANCE = 30.0
MIN_SIZE, MAX_SIZE = 64, 1024
MAX_IMAGES = 4
MAX_SEED = 2**64 - 1
MAX_LORA_SCALE = 2.0


def scheduler_named(name):
    """The SCHEDULERS key for `name`, ours or AUTOMATIC1111's ("Euler a"), any case; None if unknown."""
    for ours, theirs in A1111_SAMPLERS.items():
        if name.strip().lower() in (ours.lower(), theirs.lower()):
            return ours
    return None


def sampler(name, config):
    """The SCHEDULERS entry `name` made from the model's scheduler config (its prediction type, its betas). A model
    trained with zero terminal SNR (train_text_to_image.py --zero_terminal_snr) is refused a sampler that can't
    rescale its betas so (PNDM), naming those that can."""
    made = SCHEDULERS[name](config)
    if config.get("rescale_betas_zero_snr") and not supports_zero_terminal_snr(type(made)):
        able = [other for other, make in SCHEDULERS.items() if supports_zero_terminal_snr(type(make(config)))]
        raise RequestRefused(
            f"the scheduler {name} can't sample this model, which was trained with zero terminal SNR; choose one of"
            f" {', '.join(able)}",
            param="scheduler",
        )
    return made


def random_seed():
    """A seed for a request that gave none: below 2^32, short enough to copy by hand."""
    return random.randint(0, 2**32 - 1)


def image_seeds(seed, count):
    """The seed of each image of a request: image i uses seed + i (wrapping past MAX_SEED)."""
    return [(seed + i) % (MAX_SEED + 1) for i in range(count)]


class QueueFull(Exception):
    """Every generation slot is busy and `max_queue` requests already wait; come back in `retry_after` s."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class RequestQueue:
    """The queue both front-ends share: `concurrency` requests run, `max_queue` wait, more are refused."""

    def __init__(self, *, concurrency, max_queue):
        self.concurrency, self.max_queue = concurrency, max_queue
        self.slots = threading.Semaphore(concurrency)
        self.lock = threading.Lock()
        self.admitted = 0  # running + waiting
        self.running = 0
        self.seconds_per_request = None  # a running mean, for telling a refused client when to come back

    @property
    def waiting(self):
        return self.admitted - self.running

    def retry_after(self):
        """Seconds until a slot is likely free: the requests ahead of a newcomer times the mean request time."""
        per_request = self.seconds_per_request or 1.0
        return max(1, round(per_request * self.admitted / self.concurrency))

    @contextmanager
    def turn(self, stop):
        """Wait for a generation slot (in the calling thread) and hold it; QueueFull if the queue is full.
        Gives True once it holds a slot, or False if the threading.Event `stop` was set while it waited."""
        with self.lock:
            if self.admitted >= self.concurrency + self.max_queue:
                retry_after = self.retry_after()
                raise QueueFull(
                    f"The server is busy ({self.running} generating, {self.waiting} waiting, --max_queue"
                    f" {self.max_queue}); try again in about {retry_after} s",
                    retry_after,
                )
            self.admitted += 1
        try:
            # The request looks at its switch while it waits (acquire returns as soon as a slot frees, so the
            # timeout only bounds how late a stop is seen).
            while not self.slots.acquire(timeout=0.1):
                if stop.is_set():
                    yield False
                    return
            try:
                with self.lock:
                    self.running += 1
                start = time.perf_counter()
                try:
                    yield True
                finally:
                    seconds = time.perf_counter() - start
                    with self.lock:
                        self.running -= 1
                        mean = self.seconds_per_request
                        self.seconds_per_request = seconds if mean is None else 0.8 * mean + 0.2 * seconds
            finally:
                self.slots.release()
        finally:
            with self.lock:
                self.admitted -= 1


class Generation:
    """One request while it waits and runs: how far it has got, and the switch that stops it.

    source: who asked ("sdapi" for /sdapi/v1, "page:<session>" for a page's visitor), so that a stop reaches only
    that one's requests. on_step(step, steps) is called after each denoising step, in the generating thread.
    """

    def __init__(self, *, source="", on_step=None):
        self.source, self.on_step = source, on_step
        self.stop = threading.Event()
        self.started = None  # time.time() when its turn came; None while it waits
        self.step = self.steps = 0  # denoising steps done, and to do (an edit runs only its strength's share)
        self.stopped_at = None  # the steps done when a stop ended it early

    def step_done(self, pipeline, index, timestep, tensors):
        """diffusers' callback_on_step_end: count the step, and end the run here if the switch is on (the pipeline
        then skips its other steps and decodes the latents as they stand; diffusers documents `_interrupt`)."""
        self.step, self.steps = index + 1, pipeline.num_timesteps
        if self.on_step is not None:
            self.on_step(self.step, self.steps)
        if self.stop.is_set() and self.step < self.steps and self.stopped_at is None:
            pipeline._interrupt = True
            self.stopped_at = self.step
        return tensors


# AUTOMATIC1111's LoRA tag in a prompt: <lora:name:weight>, <lora:name> at weight 1, or the text encoder's and the
# UNet's weights apart: <lora:name:0.5:1>, or <lora:name:te=0.5:unet=1>.
LORA_TAG = re.compile(r"<lora:([^:<>]+)((?::[^:<>]*)*)>")


def lora_tags(prompt):
    """(the prompt without its <lora:...> tags, [(name, [its arguments as written, after the name]), ...])."""
    tags = [
        (name.strip(), [a.strip() for a in arguments.split(":")[1:]]) for name, arguments in LORA_TAG.findall(prompt)
    ]
    return LORA_TAG.sub("", prompt), tags


def tag_weights(name, arguments):
    """(text encoder weight, UNet weight) of a <lora:name:...> tag, as AUTOMATIC1111 reads them: the first number is
    the text encoder's and the second the UNet's, which is the first's when left out; te= and unet= name them.
    ValueError, saying what to change."""
    positional, named = [], {}
    for argument in arguments:
        key, is_named, value = argument.partition("=")
        if is_named:
            if key.strip() not in ("te", "unet"):
                raise ValueError(f"<lora:{name}:{argument}>: {key.strip()}= is not supported here; te= and unet= are")
            named[key.strip()] = value.strip()
        elif argument:
            positional.append(argument)
    if len(positional) > 2:
        raise ValueError(
            f"<lora:{name}:{':'.join(arguments)}>: at most two weights, the text encoder's and the UNet's"
        )
    written = {"te": named.get("te", positional[0] if positional else "1")}
    written["unet"] = named.get("unet", positional[1] if len(positional) > 1 else written["te"])
    weights = []
    for part in ("te", "unet"):
        try:
            weight = float(written[part])
        except ValueError:
            raise ValueError(f"<lora:{name}:{written[part]}>: the weight must be a number") from None
        if not -MAX_LORA_SCALE <= weight <= MAX_LORA_SCALE:
            raise ValueError(
                f"<lora:{name}:{written[part]}>: the weight must be from {-MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g}"
            )
        weights.append(weight)
    return tuple(weights)


class RequestRefused(ValueError):
    """A request this server's model can't run as asked: the client's error (400, naming `param`), not a failed
    generation."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


class LoraRemoved(RequestRefused):
    """A request's LoRA was let go of (ImageService.refresh_loras) while the request waited for its turn."""

    def __init__(self, message):
        super().__init__(message, param="prompt")


class LoraMix:
    """The LoRAs a request applies, at their weights: ((adapter, (text encoder weight, UNet weight)), ...), sorted;
    () for none.

    The weights live in the UNet's and text encoder's LoRA layers, which every request shares. So requests with
    the same mix run together (as many as the queue lets run), and a request with another waits until they are
    done, then sets its own. Requests go in the order they came: one that arrives after a request waiting for
    another mix waits too, so a steady stream of one mix can't keep a request with another waiting for ever.
    """

    def __init__(self, pipeline, mix):
        self.pipeline, self.running = pipeline, 0
        self.waiting = collections.deque()  # the requests waiting, first come first
        self.changed = threading.Condition()
        self.apply(mix)

    def apply(self, mix):
        if mix:
            self.pipeline.enable_lora()
            # One weight where both parts share it, else each part's (diffusers warns of a part the LoRA lacks).
            with_text = set(self.pipeline.get_list_adapters().get("text_encoder", []))
            weights = [{"unet": unet, "text_encoder": te} if te != unet and name in with_text else unet
                       for name, (te, unet) in mix]  # fmt: skip
            self.pipeline.set_adapters([name for name, _ in mix], adapter_weights=weights)
        else:
            self.pipeline.disable_lora()
        self.current = mix

    @contextmanager
    def at(self, mix):
        with self.changed:
            ticket = object()
            self.waiting.append(ticket)
            self.changed.wait_for(lambda: self.waiting[0] is ticket and (self.running == 0 or self.current == mix))
            self.waiting.popleft()
            # A refresh that went first may have deleted an adapter of this mix while it waited.
            gone = [name for name, _ in mix if name not in self.adapters()]
            if gone:
                self.changed.notify_all()
                raise LoraRemoved(f"the LoRA adapters {', '.join(gone)} were deleted while the request waited")
            if mix != self.current:
                self.apply(mix)
            self.running += 1
            self.changed.notify_all()  # the next request may start beside this one, if it has this mix
        try:
            yield
        finally:
            with self.changed:
                self.running -= 1
                self.changed.notify_all()

    def adapters(self):
        """The names of the adapters the pipeline has, in the UNet or the text encoder."""
        return {name for names in self.pipeline.get_list_adapters().values() for name in names}

    @contextmanager
    def alone(self):
        """Hold the LoRA layers alone, in turn with the requests: for loading or deleting adapters, which would
        change them under a running request. The mix of before is applied again after."""
        with self.changed:
            ticket = object()
            self.waiting.append(ticket)
            self.changed.wait_for(lambda: self.waiting[0] is ticket and self.running == 0)
            try:
                yield
            finally:
                self.waiting.popleft()
                present = self.adapters()
                self.apply(tuple(item for item in self.current if item[0] in present))
                self.changed.notify_all()


def a1111_value(value):
    """A value as AUTOMATIC1111 writes it in its key: value list: quoted as JSON if it holds , : or a newline."""
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return json.dumps(text) if any(c in text for c in ",:\n") else text


def parameters_text(
    *, prompt, negative_prompt, steps, scheduler, guidance_scale, seed, width, height, model, lora, lora_scale=1.0,
    strength=None, clip_skip=1, guidance_rescale=0.0, stopped_at=None,
):  # fmt: skip
    """The `parameters` text chunk of one image, in AUTOMATIC1111's layout (see the module docstring); an edited
    image's `strength` is A1111's "Denoising strength"; a guidance rescale is "Rescale CFG", as the web UIs of the
    Forge family write theirs; `stopped_at`: the steps a stopped run had done."""
    fields = {
        "Steps": steps,
        "Sampler": A1111_SAMPLERS[scheduler],
        "CFG scale": float(guidance_scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model": model,
    }
    if strength is not None:
        fields["Denoising strength"] = float(strength)
    if clip_skip > 1:  # AUTOMATIC1111 writes it only when set
        fields["Clip skip"] = clip_skip
    if guidance_rescale > 0:
        fields["Rescale CFG"] = float(guidance_rescale)
    if lora:
        fields["Lora"] = lora
    if lora_scale != 1:
        fields["Lora scale"] = float(lora_scale)
    if stopped_at is not None:  # not the image these settings make: the run was stopped part way
        fields["Interrupted at step"] = stopped_at
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {a1111_value(value)}" for key, value in fields.items()))
    return "\n".join(lines)


# One `key: value` of the last line of a parameters text; a value holding , : or a newline is quoted as JSON.
PARAMETER = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def read_parameters(text):
    """A parameters text (ours or AUTOMATIC1111's) as AUTOMATIC1111's PNG Info reads it: {"Prompt", "Negative
    prompt", and each field of the last line, a string; "Size" as "Size-1" and "Size-2"}; "Clip skip" is "1"
    when not written."""
    *lines, last = text.strip().split("\n")
    if len(PARAMETER.findall(last)) < 3:  # no settings line: all of it is the prompt
        lines, last = [*lines, last], ""
    prompt, negative = [], []
    for line in lines:
        if line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt).strip(), "Negative prompt": "\n".join(negative).strip()}
    for key, value in PARAMETER.findall(last):
        value = json.loads(value) if value.startswith('"') else value.strip()
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.groups()
        else:
            fields[key] = value
    fields.setdefault("Clip skip", "1")
    return fields


class ImageService:
    """One loaded pipeline behind one RequestQueue, for the web page and the API alike."""

    def __init__(
        self, pipeline, *, model_name, lora_name=None, lora_scale=1.0, queue, embeddings=(), loras=None, clip_skip=1,
        lora_dir=None, guidance_rescale=None,
    ):  # fmt: skip
        self.pipeline = pipeline
        self.clip_skip = clip_skip  # the text encoder's layer prompts are read from, 1 the last (see encode_text)
        # How much text-to-image requests rescale their guidance unless they say (None: the model's own, 0.7 for a
        # model that samples with zero terminal SNR). diffusers' image to image and inpainting have no rescale.
        if guidance_rescale is None:
            guidance_rescale = default_guidance_rescale(pipeline.scheduler)
        self.guidance_rescale = guidance_rescale
        self.embeddings = list(embeddings)  # the names of the textual inversion embeddings loaded (for /health)
        self.model_name, self.lora_name, self.lora_scale = model_name, lora_name, lora_scale
        # The LoRAs --lora_dir loaded, {name: adapter}, which prompts apply with <lora:name:weight> tags; the folder,
        # which refresh_loras reads again.
        self.loras, self.lora_dir = dict(loras or {}), lora_dir
        # The served LoRA, from --lora or as the model itself (a LoRA run's folder): requests may set its scale.
        self.served = [a for a in pipeline.get_active_adapters() if a not in self.loras.values()]
        with_loras = self.served or self.loras or lora_dir
        self.mixer = LoraMix(pipeline, self.lora_mix("", lora_scale)) if with_loras else None
        # What API clients pass as `model` and what /v1/models lists.
        self.model_id = model_name if lora_name is None else f"{model_name}+{lora_name}"
        self.queue = queue
        # The requests in the queue (a Generation each), first come first, for /sdapi/v1/progress and stops.
        self.generations, self.generations_lock = [], threading.Lock()
        self.default_size = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
        self.started = time.time()
        # The tokenizer keeps its padding and truncation settings in state its calls share: two threads using it
        # at once can each run with the other's (an unpadded "" of 2 tokens beside a padded prompt of 77, and
        # the batch fails). Every use of it here holds this lock; the UNet's steps don't need it.
        self.tokenizer_lock = threading.Lock()

    def clip_windows(self, text):
        """How many of CLIP's 77-token windows the prompt `text` is read in (see sdtoolkit/clip_windows.py)."""
        with self.tokenizer_lock:
            return len(token_windows(self.pipeline.tokenizer, parse_emphasis(lora_tags(text)[0])))

    def check_prompt(self, prompt, negative_prompt="", lora_scale=None):
        """The request's LoraMix (see lora_mix; lora_scale None: the server's); ValueError, saying what to change,
        for a prompt or negative prompt this server can't read as written: AUTOMATIC1111 syntax it does not have
        (see unsupported_syntax), or a <lora:...> tag it can't apply."""
        for text in (prompt, negative_prompt):
            problem = unsupported_syntax(text)
            if problem:
                raise ValueError(problem)
        return self.lora_mix(prompt, self.lora_scale if lora_scale is None else lora_scale, negative_prompt)

    def lora_mix(self, prompt, lora_scale, negative_prompt=""):
        """The LoraMix of a request: the served LoRA at `lora_scale`, and the --lora_dir LoRAs the prompt's tags
        name, at their weights. ValueError, saying what to change, for a tag this server can't apply."""
        weights = {adapter: (lora_scale, lora_scale) for adapter in self.served}
        if lora_tags(negative_prompt)[1]:
            raise ValueError("<lora:...> tags go in the prompt, not in the negative prompt")
        for name, arguments in lora_tags(prompt)[1]:
            if name not in self.loras:
                known = ", ".join(sorted(self.loras)) or "none: start the server with --lora_dir"
                raise ValueError(f"<lora:{name}> names no LoRA of this server; it has: {known}")
            weights[self.loras[name]] = tag_weights(name, arguments)  # a LoRA tagged twice: the last tag's weights
        return tuple(sorted(weights.items()))

    def refresh_loras(self):
        """Read --lora_dir again, as AUTOMATIC1111's refresh: load the files added since, and let go of the LoRAs
        whose files are gone. Waits for the running requests, and requests that come meanwhile wait for it.
        Returns ([names added], [names removed], [(file, why skipped), ...])."""
        if self.lora_dir is None:
            raise ValueError("this server has no --lora_dir to read again")
        with self.mixer.alone():
            present = {name for _, _, name in safetensors_files(self.lora_dir)[0]}
            removed = sorted(name for name in self.loras if name not in present)
            for name in removed:
                self.pipeline.delete_adapters(self.loras.pop(name))
            added, skipped = load_lora_dir(self.pipeline, self.lora_dir, loaded=self.loras)
            self.loras.update(added)
        return sorted(added), removed, skipped

    def in_queue(self, source):
        """The Generations of `source` waiting or running, the running ones first, oldest first."""
        with self.generations_lock:
            mine = [g for g in self.generations if g.source == source]
        return sorted(mine, key=lambda g: g.started is None)

    def stop(self, source, *, waiting=False):
        """Stop the running generations of `source` after their current step (and its waiting ones too, with
        waiting=True: they leave the queue); how many were told."""
        told = [g for g in self.in_queue(source) if waiting or g.started is not None]
        for generation in told:
            generation.stop.set()
        return len(told)

    def generate(
        self, *, prompt, negative_prompt, steps, guidance_scale, seed, scheduler, width, height, num_images,
        lora_scale=None, image=None, mask=None, strength=None, clip_skip=None, guidance_rescale=None, generation=None,
    ):  # fmt: skip
        """`num_images` PIL images for checked inputs, image i from seed + i, each with its parameters text in
        image.info["parameters"] (PIL writes str entries of .info as PNG text chunks; Gradio keeps them too).
        lora_scale: the LoRA's scale for this request (None: the server's --lora_scale).
        image: an image to edit (resized to width x height), noised to `strength` (0 to 1) of the schedule and
        denoised under the prompt; mask: an "L" image of its size, white where to edit (inpainting; the rest
        is kept), or None to edit all of it. clip_skip: this request's (None: the server's --clip_skip).
        guidance_rescale: this text to image request's, 0 to 1 (None: the server's; an edit has none).
        generation: the request's Generation, to watch it or stop it. A run stopped part way gives the images as
        its latents stood (generation.stopped_at says when, and so does each image's parameters text); one stopped
        while it waited gives no images."""
        if lora_scale is not None and not self.served:
            raise ValueError("lora_scale is for a LoRA, and this pipeline has none")
        lora_scale = self.lora_scale if lora_scale is None else lora_scale
        clip_skip = self.clip_skip if clip_skip is None else clip_skip
        if image is not None and guidance_rescale:
            raise ValueError(
                "guidance_rescale is for text to image: diffusers' image to image and inpainting have none"
            )
        if guidance_rescale is None:
            guidance_rescale = self.guidance_rescale if image is None else 0.0
        mix = self.check_prompt(prompt, negative_prompt, lora_scale)
        seeds = image_seeds(seed, num_images)
        # A pipeline of our own per request: it shares the weights, but the scheduler holds per-run state. Image
        # to image and inpainting are other diffusers pipelines on the same weights.
        pipeline = self.pipeline
        components = {**pipeline.components, "scheduler": sampler(scheduler, pipeline.scheduler.config)}
        size = {"width": width, "height": height}
        if image is None:
            pipeline_cls, inputs = StableDiffusionPipeline, {**size, "guidance_rescale": guidance_rescale}
        elif mask is None:
            pipeline_cls, inputs = (
                StableDiffusionImg2ImgPipeline,
                {"image": image.resize((width, height)), "strength": strength},
            )
        else:
            # SD v1's UNet is not an inpainting one: diffusers keeps the unmasked part of the image at every step.
            pipeline_cls = StableDiffusionInpaintPipeline
            inputs = {"image": image, "mask_image": mask, "strength": strength, **size}
        run = pipeline_cls(**components, requires_safety_checker=pipeline.config.requires_safety_checker)
        run.set_progress_bar_config(disable=True)
        # One generator per image: diffusers draws image i's starting noise (and an ancestral sampler's noise)
        # from generators[i] alone, so image i is (up to rounding in batched maths) the one-image request's with seeds[i].
        device = "cpu" if pipeline.device.type == "mps" else pipeline.device
        generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        at_mix = self.mixer.at(mix) if self.mixer is not None else nullcontext()
        generation = generation or Generation()
        generation.steps = min(int(steps * strength), steps) if image is not None else steps  # until it runs
        with self.generations_lock:
            self.generations.append(generation)
        try:
            with self.queue.turn(generation.stop) as started:
                if not started:  # stopped while it waited
                    generation.stopped_at = 0
                    return []
                generation.started = time.time()
                with at_mix, torch.inference_mode():
                    # The text embeddings first, under the tokenizer's lock, for one image; the pipeline repeats them.
                    # The LoRA tags are the prompt's instructions, not its text.
                    with self.tokenizer_lock:
                        text = lora_tags(prompt)[0]
                        prompt_embeds, negative_embeds = encode_prompts(
                            run, text, negative_prompt, guidance_scale > 1, clip_skip=clip_skip
                        )
                    try:
                        images = run(
                            prompt_embeds=prompt_embeds,
                            negative_prompt_embeds=negative_embeds,
                            num_inference_steps=steps,
                            guidance_scale=guidance_scale,
                            num_images_per_prompt=num_images,
                            generator=generators,
                            callback_on_step_end=generation.step_done,
                            **inputs,
                        ).images
                    except torch.OutOfMemoryError as err:
                        # Give the memory back for the next request, and say what would fit (the page and /v1 say).
                        if torch.cuda.is_available():
                            torch.cuda.empty_cache()
                        raise RuntimeError(
                            f"out of GPU memory for {num_images} image(s) of {width}x{height} ({first_line(err)}); ask"
                            " for fewer images or a smaller size"
                        ) from None
        except LoraRemoved:
            # /sdapi/v1/refresh-loras let go of a LoRA the prompt names, after the prompt was checked.
            gone = ", ".join(f"<lora:{name}>" for name, _ in lora_tags(prompt)[1] if name not in self.loras)
            raise LoraRemoved(
                f"a refresh of --lora_dir let go of {gone or 'a LoRA the prompt names'} while this request waited"
                " (its file was removed)"
            ) from None
        finally:
            with self.generations_lock:
                self.generations.remove(generation)
        for result, image_seed in zip(images, seeds):
            result.info["parameters"] = parameters_text(
                prompt=prompt,
                negative_prompt=negative_prompt,
                steps=steps,
                scheduler=scheduler,
                guidance_scale=guidance_scale,
                seed=image_seed,
                width=width,
                height=height,
                model=self.model_name,
                lora=self.lora_name,
                lora_scale=lora_scale,
                strength=strength if image is not None else None,  # an edit's
                clip_skip=clip_skip,
                guidance_rescale=guidance_rescale,
                stopped_at=generation.stopped_at,
            )
        return images
