"""Helpers shared by the test files: running the CLI in-process, the one-line error form, a real SIGKILL, and
`encoded_stage`, a synthetic encode folder for the training tests."""
import functools
import os
import signal
import subprocess
import time
from pathlib import Path

from typer.testing import CliRunner

from popyou_cli.cli.app import app


def invoke(*args):
    """`popyou ARGS` in this process (importing the stack once per test session, not per call)."""
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, exit_code: int | None = 1) -> str:
    """Asserts the user-error form: exit status `exit_code` (None: any failure) and one line starting 'error:'."""
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert (res.exit_code != 0) if exit_code is None else (res.exit_code == exit_code), res.output
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    return lines[0]


def kill_after_first_shard(cmd: list[str], out: Path, cwd: Path, env: dict | None = None) -> int:
    """Starts `cmd`, SIGKILLs it as soon as a finished shard file appears in `out`, returns its exit status."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.arrow")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no shard written within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode


@functools.lru_cache(maxsize=None)
def encoded_stage(n=192, concepts=8, variants=4, dim=32, errors=(), drop=(), patch_nums=(1, 2, 3, 4)) -> Path:
    """An `encode` folder as the data contract describes, built once per test process. Images: `concepts`
    smooth random pictures, each in `variants` shifted versions, encoded by the tiny VQ-VAE (codes_flip from the
    mirrored image). Embeddings: a unit vector per concept plus noise (text ones rotated), so the embedding
    tells which concept a row's codes come from: a working adapter must beat shuffled embeddings."""
    import atexit
    import shutil
    import tempfile

    import datasets
    import torch
    import torch.nn.functional as F

    from popyou_cli.models.checkpoints import load_vqvae
    from popyou_cli.store import StageWriter

    root = Path(tempfile.mkdtemp(prefix="popyou-test-enc-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    vae = load_vqvae("tiny", patch_nums=patch_nums)
    g = torch.Generator().manual_seed(0)
    base = F.interpolate(torch.rand(concepts, 3, 4, 4, generator=g) * 2 - 1, size=(64, 64), mode="bicubic")
    imgs = torch.stack([torch.roll(base[k], 4 * v, dims=2) for k in range(concepts) for v in range(variants)])
    imgs = imgs.clamp(-1, 1)
    codes, flipped = (torch.cat(vae.encode_codes(x), 1).to(torch.int16) for x in (imgs, imgs.flip(-1)))
    k = torch.arange(n) % concepts
    u = k * variants + torch.randint(variants, (n,), generator=g)
    E = F.normalize(torch.randn(concepts, dim, generator=g), dim=-1)
    R = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]

    def emb(M):
        return F.normalize(M[k] + 0.3 * torch.randn(n, dim, generator=g) / dim**0.5, dim=-1).half().numpy()

    cols = {"codes": codes[u].numpy(), "codes_flip": flipped[u].numpy(), "siglip_image": emb(E),
            "siglip_text_prompt": emb(E @ R), "siglip_text_caption": emb(E @ R.T),
            "encode_error": ["unreadable image" if i in errors else "" for i in range(n)]}
    for c in drop:
        del cols[c]
    L = codes.shape[1]
    feats = datasets.Features({c: datasets.Value("string") if c == "encode_error" else
                               datasets.Sequence(datasets.Value("int16" if c.startswith("codes") else "float16"),
                                                 length=L if c.startswith("codes") else dim) for c in cols})
    w = StageWriter(root / "enc", stage="encode", parent=None, features=feats, n_rows=n, shard_size=64,
                    settings={"patch_nums": list(patch_nums), "vqvae": "tiny", "siglip_model": "tiny",
                              "siglip_pretrained": None, "siglip_dim": dim})
    for spec in w.pending_shards():
        w.write_shard(spec, {c: v[spec.start:spec.stop] for c, v in cols.items()})
    w.finalize()
    return root / "enc"
