"""`popyou demo`: the original PopYOU Space (a prompt, a beta slider, a seed, a beta video), as a local Gradio app.

The pipeline loads once at start. Both tabs share one Gradio concurrency slot ("device") with a limit of one, so
requests take turns on the GPU or CPU; a lock around every pipeline call keeps that true even while a cancelled
video finishes the frame it was making. Every user mistake ends as a message in the page (gr.Error), never as a
stopped server. The generation itself is `Pipeline.__call__` / `Pipeline.beta_sweep`, so the "Reproduce" command
shown under the images gives the same pixels on the same kind of device.
"""
from __future__ import annotations

import atexit
import functools
import inspect
import math
import os
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

import gradio as gr

from popyou_cli.core.errors import PopyouError
from popyou_cli.infer.video import beta_label, label_frame, write_beta_sweep

BETA_MIN, BETA_MAX, BETA_STEP = 0.0, 2.5, 0.05  # the original Space's slider
MAX_IMAGES, MAX_FPS, MAX_SECONDS, MAX_FRAMES = 8, 30, 20, 120
FRAME_CAP_REASON = ("each frame is a whole image generation and requests take turns on the device, so a longer "
                    "video would hold everyone else's requests")
EXAMPLES = ["a wizard funko pop", "a funko pop astronaut holding a guitar", "a knight in golden armour funko pop",
            "a funko pop of a chef with a big white hat", "a pirate with a parrot on his shoulder funko pop"]
FILE_MAX_AGE_S = 3600  # videos older than this are deleted from the demo's work folder
MAX_UPLOAD = "1mb"  # the page takes no files, but Gradio's upload route exists anyway: refused past this size


def _page_errors(fn):
    """PopyouError (the one-line user errors of the whole package) -> gr.Error, a message in the page."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except PopyouError as e:
                raise gr.Error(str(e), print_exception=False) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PopyouError as e:
            raise gr.Error(str(e), print_exception=False) from None
    return wrapper


def _number(x) -> str:
    """A number as the command line should get it: integers without ".0", floats exactly (repr round-trips)."""
    x = float(x)
    return str(int(x)) if x.is_integer() else repr(x)


def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise PopyouError("type a prompt first, e.g. \"a wizard funko pop\"")
    return prompt.strip()


def check_beta(beta, name: str = "beta") -> float:
    if beta is None or not math.isfinite(float(beta)) or not BETA_MIN <= float(beta) <= BETA_MAX:
        raise PopyouError(f"{name} must be between {BETA_MIN:g} and {BETA_MAX:g} (got {beta})")
    return float(beta)


def plan_frames(beta_start: float, beta_target: float, fps, seconds) -> tuple[list[float], float, str]:
    """(betas, fps to play them at, a note when the frame cap was hit). fps x seconds frames, at most MAX_FRAMES:
    past the cap the video keeps its length and plays at a lower frame rate."""
    start, target = check_beta(beta_start, "start beta"), check_beta(beta_target, "target beta")
    for name, value, top in (("frames per second", fps, MAX_FPS), ("seconds", seconds, MAX_SECONDS)):
        if value is None or not math.isfinite(float(value)) or not 0 < float(value) <= top:
            raise PopyouError(f"{name} must be above 0 and at most {top} (got {value})")
    fps, seconds = float(fps), float(seconds)
    count, note = round(fps * seconds), ""
    if count < 2:
        raise PopyouError(f"{_number(fps)} fps for {_number(seconds)} s is {count} frame(s); a sweep needs at least 2")
    if count > MAX_FRAMES:
        note = (f"asked for {count} frames ({_number(fps)} fps x {_number(seconds)} s); capped at {MAX_FRAMES} because "
                f"{FRAME_CAP_REASON}. The video keeps its length at {MAX_FRAMES / seconds:.3g} fps.")
        count, fps = MAX_FRAMES, MAX_FRAMES / seconds
    return [start + (target - start) * i / (count - 1) for i in range(count)], fps, note


class Demo:
    """The generation side of the page, with no Gradio layout in it: check the request, take the device, run."""

    def __init__(self, pipe, spec: str | None, device: str = "auto", dtype: str = "auto", work_dir: Path | None = None,
                 cfg_scales: int | None = None):
        self.pipe = pipe
        self.spec = spec
        self.device_arg, self.dtype_arg = device, dtype
        self.cfg_scales = cfg_scales  # the server's --cfg-scales, for every request (pipe.quantize: its --quantize)
        self.lock = threading.Lock()  # one generation at a time on the device
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="popyou-demo-"))
        self.defaults = pipe.options()  # the pipeline's sampling defaults, resolved

    # --------------------------------------------------------------------------------- shared pieces
    def pipeline_arg(self) -> str:
        """What --pipeline must say for `popyou sample` to load the same pipeline from any folder."""
        spec = self.spec or self.pipe.source
        local = Path(spec).expanduser()
        return str(local.resolve()) if local.exists() else spec

    def sample_command(self, prompt: str, opts: dict, seed: int, n: int | None = None,
                       beta: float | None = None, sweep: str | None = None) -> str:
        args = ["popyou", "sample", prompt, "--pipeline", self.pipeline_arg()]
        args += ["--beta-sweep", sweep] if sweep else ["--n", str(n), "--beta", _number(beta)]
        args += ["--seed", str(seed), "--cfg", _number(opts["cfg"]), "--top-k", str(opts["top_k"]),
                 "--top-p", _number(opts["top_p"]), "--more-smooth" if opts["more_smooth"] else "--no-more-smooth"]
        for flag, value in (("--device", self.device_arg), ("--dtype", self.dtype_flag())):
            args += [flag, value] if value != "auto" else []
        for flag, value in (("--quantize", self.pipe.quantize), ("--cfg-scales", self.cfg_scales)):
            args += [flag, str(value)] if value is not None else []
        return shlex.join(args + ["--out", "samples"])

    def sampling(self, cfg, top_k, top_p, more_smooth) -> dict:
        """The tab's sampling options, checked by the pipeline (empty fields: the pipeline's defaults). A top-k
        above the vocabulary keeps every code, which is what the vocabulary's size does: clamped to it, so that
        the README's API call (top-k 900) works on any pipeline and the reproduce command says what was used."""
        if top_k is not None and int(top_k) > self.pipe.var.config.vocab_size:
            top_k = self.pipe.var.config.vocab_size
        given = dict(cfg=None if cfg is None else float(cfg), top_k=None if top_k is None else int(top_k),
                     top_p=None if top_p is None else float(top_p), more_smooth=more_smooth, cfg_scales=self.cfg_scales)
        opts = self.pipe.options(**given)
        return {"cfg": opts.cfg, "top_k": opts.top_k, "top_p": opts.top_p, "more_smooth": opts.more_smooth,
                "cfg_scales": opts.cfg_scales}

    def dtype_flag(self) -> str:
        """--dtype as the reproduce command gives it: as the server was started, or what --fast picked where that
        is not the device's auto (a command that says --fast could pick differently on another machine)."""
        from popyou_cli.core.devices import dtype_name, resolve_dtype

        if self.pipe.fast_mode is None:
            return self.dtype_arg
        return "auto" if self.pipe.dtype == resolve_dtype("auto", self.pipe.device) else dtype_name(self.pipe.dtype)

    def speed_mode(self) -> str:
        """How the images are made, for the page's header: exact, or the fast mode (--fast's pick, or the flags the
        server was started with)."""
        from popyou_cli.models.autotune import mode_named
        from popyou_cli.core.devices import dtype_name

        pipe = self.pipe
        guided = [f"guidance on the first {self.cfg_scales} scales"] if self.cfg_scales is not None else []
        if pipe.fast_mode is not None:
            flags = " ".join(mode_named(pipe.fast_mode).flags)
            if not flags and not guided:
                return "exact mode (--fast's pick for this machine)"
            picked = f"--fast picked {pipe.fast_mode}" + (f" ({flags})" if flags else "")
            return "fast mode: " + ", ".join([picked] + guided)
        dtype = dtype_name(pipe.dtype)
        flags = [f"--dtype {dtype}"] if pipe.device.type == "cpu" and dtype != "fp32" else []
        flags += [f"--quantize {pipe.quantize}"] if pipe.quantize else []
        modes = ([" ".join(flags)] if flags else []) + guided
        return "fast mode: " + ", ".join(modes) if modes else "exact mode"

    def _seed(self, seed) -> int:
        """The seed box's text: empty -> a random seed (shown with the result), else a whole number >= 0."""
        from popyou_cli.infer.options import seed_or_random

        text = "" if seed is None else str(seed).strip()
        if not text:
            return seed_or_random(None)
        try:
            value = int(text)
        except ValueError:
            raise PopyouError(f"the seed must be a whole number >= 0, or empty for a random one (got '{text}')") \
                from None
        return seed_or_random(value)

    # --------------------------------------------------------------------------------- image tab
    def images(self, prompt, beta, seed, n, cfg, top_k, top_p, more_smooth, progress=gr.Progress()):
        """(gallery [(image, caption)], a line about seeds and time, the `popyou sample` command)."""
        prompt, beta = check_prompt(prompt), check_beta(beta)
        if n is None or not 1 <= int(n) <= MAX_IMAGES or float(n) != int(n):
            raise PopyouError(f"number of images must be a whole number from 1 to {MAX_IMAGES} (got {n})")
        n, seed, opts = int(n), self._seed(seed), self.sampling(cfg, top_k, top_p, more_smooth)
        report = lambda done, total: progress((done, total), desc="images", unit="images")  # noqa: E731
        with self.lock:
            t0 = time.perf_counter()
            images = self.pipe(prompt, n=n, seed=seed, beta=beta, on_image=report, **opts)
            took = time.perf_counter() - t0
        gallery = [(img, f"seed {img.info['seed']}") for img in images]
        seeds = f"seed {seed}" if n == 1 else f"seeds {seed}-{seed + n - 1} (image k uses seed + k)"
        info = f"**Seed {seed}** · {seeds} · {took:.1f} s ({took / n:.2f} s per image on {self.pipe.device})"
        return gallery, info, self.sample_command(prompt, opts, seed, n=n, beta=beta)

    # --------------------------------------------------------------------------------- video tab
    def video(self, prompt, beta_start, beta_target, fps, seconds, seed, cfg, top_k, top_p, more_smooth,
              progress=gr.Progress()):
        """Yields (latest frame, status) as frames are made, then (frame, status, mp4 path, strip, command).
        The frames are made a batch at a time (one frame on a CPU) between yields, so a cancel stops the video
        after the current batch."""
        prompt = check_prompt(prompt)
        betas, play_fps, note = plan_frames(beta_start, beta_target, fps, seconds)
        seed, opts = self._seed(seed), self.sampling(cfg, top_k, top_p, more_smooth)
        batch = 1 if self.pipe.device.type == "cpu" else 8  # a CPU gains nothing from batching; show each frame
        frames, cap = [], f"\n\n{note}" if note else ""
        t0 = time.perf_counter()
        for start in range(0, len(betas), batch):
            chunk = betas[start:start + batch]
            with self.lock:
                made = self.pipe.beta_sweep(prompt, chunk, seed=seed, batch_size=len(chunk), **opts)
            frames += made
            progress((len(frames), len(betas)), desc="frames", unit="frames")
            status = f"frame {len(frames)} of {len(betas)} (beta {chunk[-1]:.2f}), seed {seed}{cap}"
            yield label_frame(frames[-1], beta_label(chunk[-1])), status, gr.skip(), gr.skip(), gr.skip()
        took = time.perf_counter() - t0
        self._prune_old_files()
        path, strip = write_beta_sweep(frames, betas, self.work_dir / f"beta-sweep-{uuid.uuid4().hex[:12]}.mp4",
                                       play_fps)
        sweep = f"{_number(betas[0])}:{_number(betas[-1])}:{len(betas)}"
        status = (f"**{len(frames)} frames**, beta {betas[0]:.2f} -> {betas[-1]:.2f}, seed {seed}, "
                  f"{_number(round(play_fps, 3))} fps; {took:.1f} s ({took / len(frames):.2f} s per frame){cap}")
        yield (label_frame(frames[-1], beta_label(betas[-1])), status, str(path), strip,
               self.sample_command(prompt, opts, seed, sweep=sweep))

    def _prune_old_files(self) -> None:
        now = time.time()
        for old in self.work_dir.glob("*.mp4"):
            if now - old.stat().st_mtime > FILE_MAX_AGE_S:
                old.unlink(missing_ok=True)


def _sampling_options(d, vocab: int) -> list:
    """The folded "Sampling options" of a tab: cfg, top-k, top-p, more smooth (the pipeline's defaults `d`)."""
    with gr.Accordion("Sampling options", open=False):
        with gr.Row():
            cfg = gr.Number(d.cfg, label="CFG (guidance; 0 = off)", minimum=0, step=0.1)
            top_k = gr.Number(d.top_k, label=f"Top-k (0 = off; {vocab} = all codes)", minimum=0, precision=0)
            top_p = gr.Slider(0, 1, value=d.top_p, step=0.01, label="Top-p (0 = off)")
            smooth = gr.Checkbox(bool(d.more_smooth), label="More smooth")
    return [cfg, top_k, top_p, smooth]


def _seed_box(elem_id: str):
    # a text box, not gr.Number: a number box cannot stay empty in the page (it shows and sends 0)
    return gr.Textbox("", label="Seed (empty = random; the one used is shown)", placeholder="random",
                      max_lines=1, elem_id=elem_id)


def _reproduce_box(elem_id: str):
    return gr.Code(label="Reproduce with", language="shell", lines=2, wrap_lines=True, show_line_numbers=False,
                   elem_id=elem_id)


def _image_tab(demo: Demo, vocab: int) -> None:
    """The Image tab: a prompt, beta, seed and count -> a gallery, the seeds and time, the reproduce command."""
    d = demo.defaults
    with gr.Tab("Image", id="image"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder=EXAMPLES[0], lines=2, elem_id="prompt")
                beta = gr.Slider(BETA_MIN, BETA_MAX, value=min(max(float(d.beta), BETA_MIN), BETA_MAX),
                                 step=BETA_STEP, elem_id="beta",
                                 label="Beta (weight of the prompt; 0 = a generic Funko Pop!)")
                with gr.Row():
                    seed = _seed_box("seed")
                    n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Number of images", elem_id="n")
                options = _sampling_options(d, vocab)
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery")
                info = gr.Markdown(elem_id="image-info")
                command = _reproduce_box("command")
        image_event = dict(fn=_page_errors(demo.images), inputs=[prompt, beta, seed, n, *options],
                           outputs=[gallery, info, command], concurrency_id="device", concurrency_limit=1)
        go.click(api_name="generate", **image_event)
        prompt.submit(api_name=False, **image_event)


def _video_tab(demo: Demo, vocab: int) -> None:
    """The Beta video tab: a prompt, start and target beta, frame rate and length, seed -> the frames as they come,
    the MP4, the labelled strip, the reproduce command; Stop cancels the video."""
    with gr.Tab("Beta video", id="video"):
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", placeholder=EXAMPLES[0], lines=2, elem_id="v-prompt")
                with gr.Row():
                    b0 = gr.Slider(BETA_MIN, BETA_MAX, value=0.0, step=BETA_STEP, label="Start beta",
                                   elem_id="beta-start")
                    b1 = gr.Slider(BETA_MIN, BETA_MAX, value=BETA_MAX, step=BETA_STEP, label="Target beta",
                                   elem_id="beta-target")
                with gr.Row():
                    fps = gr.Slider(1, MAX_FPS, value=8, step=1, label="Frames per second", elem_id="fps")
                    seconds = gr.Slider(1, MAX_SECONDS, value=3, step=0.5, label="Seconds", elem_id="seconds")
                seed = _seed_box("v-seed")
                options = _sampling_options(demo.defaults, vocab)
                gr.Markdown(f"At most {MAX_FRAMES} frames: {FRAME_CAP_REASON}.")
                with gr.Row():
                    go = gr.Button("Generate video", variant="primary", elem_id="generate-video")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop-video")
                gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Example prompts")
            with gr.Column():
                frame = gr.Image(label="Latest frame", type="pil", format="png", height=256, elem_id="frame")
                status = gr.Markdown(elem_id="video-status")
                video = gr.Video(label="Beta sweep (MP4, H.264)", format="mp4", height=320, loop=True,
                                 elem_id="video")
                strip = gr.Image(label="Frames, each labelled with its beta", type="pil", format="png",
                                 elem_id="strip")
                command = _reproduce_box("v-command")
        video_event = go.click(_page_errors(demo.video), api_name="video",
                               inputs=[prompt, b0, b1, fps, seconds, seed, *options],
                               outputs=[frame, status, video, strip, command], concurrency_id="device",
                               concurrency_limit=1, show_progress_on=[video])  # frames stay visible
        stop.click(_stopped, inputs=status, outputs=status, cancels=[video_event], queue=False, api_name=False)


def build_app(demo: Demo):
    """The page: header, Image tab, Beta video tab. Returns the gr.Blocks (not launched)."""
    pipe = demo.pipe
    vocab = pipe.var.config.vocab_size
    with gr.Blocks(title="popyou demo", analytics_enabled=False, delete_cache=(FILE_MAX_AGE_S, FILE_MAX_AGE_S)) as app:
        gr.Markdown(f"# popyou demo\n**{pipe.description}** · {pipe.image_size} px on {pipe.device} · "
                    f"{demo.speed_mode()} · one request at a time: others wait in the queue", elem_id="header")
        _image_tab(demo, vocab)
        _video_tab(demo, vocab)
    return app


def _stopped(status: str) -> str:
    """The status line after Stop: only a video still in progress ("frame i of n ...") was stopped."""
    return f"{status}\n\n**Stopped**: no video was written." if (status or "").startswith("frame ") else status


def run_demo(*, pipeline: str | None, host: str, port: int, share: bool, device: str, dtype: str, console,
             quantize: str | None = None, cfg_scales: int | None = None, fast: bool | None = None) -> None:
    """Loads the pipeline once, then serves the page until interrupted. fast None: on unless dtype or quantize
    names a mode (the demo is fast by default; sample and eval are exact by default)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local tool
    from popyou_cli.models.autotune import check_fast
    from popyou_cli.infer.pipeline import Pipeline
    from popyou_cli.infer.resolve import default_pipeline
    from popyou_cli.infer.options import SamplingOptions

    _check_can_listen(host, port)  # before the (slow) model load
    SamplingOptions(cfg_scales=cfg_scales).check()
    if fast is None:
        fast = quantize is None and dtype in (None, "auto")
    check_fast(fast, dtype, quantize)  # before the loading line: a refusal is one line
    mode = "fastest mode (--fast)" if fast else f"dtype {dtype}" + (f", --quantize {quantize}" if quantize else "")
    console.print(f"demo: loading {pipeline or default_pipeline()} (device {device}, {mode}) ...",
                  highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    pipe = Pipeline.from_pretrained(pipeline, device=device, dtype=dtype, quantize=quantize, fast=fast)
    if not pipe.has_text:
        raise PopyouError(f"{pipe.source} is a class-conditional model with no text encoder; the demo needs a "
                          "text-to-image pipeline (popyou train-adapter, or the default original model)")
    demo = Demo(pipe, pipeline, device=device, dtype=dtype, cfg_scales=cfg_scales)
    console.print(f"demo: loaded {pipe.description} on {pipe.device} in {time.perf_counter() - t0:.1f} s; "
                  f"{demo.speed_mode()}", highlight=False, soft_wrap=True)
    atexit.register(shutil.rmtree, demo.work_dir, ignore_errors=True)
    app = build_app(demo).queue(default_concurrency_limit=1, max_size=64)
    where = "every network interface" if host in ("0.0.0.0", "::") else host
    console.print(f"demo: serving on {where}, port {port}{' and a public share link' if share else ''}; "
                  "Ctrl+C stops it", highlight=False, soft_wrap=True)
    _stop_on_sigterm()
    try:
        app.launch(server_name=host, server_port=port, share=share, show_error=True, ssr_mode=False,
                   allowed_paths=[str(demo.work_dir)], footer_links=["api"], max_file_size=MAX_UPLOAD)
    except OSError:
        raise PopyouError(f"cannot listen on {host}:{port} (in use?); pass another --port") from None


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, a test's teardown) stops the server like Ctrl+C does, so Gradio closes it and
    the work folder is removed; by default SIGTERM would end the process without either."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (run_demo called from a library): leave signals alone
        pass


def _check_can_listen(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise PopyouError(f"--port must be 1-65535 (got {port})")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, port))
    except OSError as e:
        raise PopyouError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port or --host") \
            from None
