"""Pretraining from `pipe:` shards with `data.decode: gpu` (the device path, on the CPU here) resumes exactly."""
import os
import sys
from pathlib import Path

from safetensors.torch import load_file

from mff_ds.data import demo
from mff_ds.data.make_shards import convert
import forkserver

REPO = Path(__file__).resolve().parents[1]

RECIPE = """
name: pipe
seed: 5
model: {{arch: mff_vit_tiny_patch16, img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2,
        decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2, out_indices: [0, 1], kernels: torch}}
data: {{source: webdataset, path: "pipe:cat {shards}/train-{{000000..000003}}.tar", decode: gpu, num_workers: 2,
        shuffle_buffer: 8}}
batch: {{global_batch: 8, micro_batch: 4}}
schedule: {{epochs: 2, warmup_epochs: 1}}
checkpoint: {{every_steps: 2, keep_last: 2}}
logging: {{every_steps: 2, image_every_steps: 0, progress_bar: false, tensorboard: false}}
"""  # 40 samples from _info.json (fetched through `cat`); 2 ranks x 2 workers read the 4 shards: 5 micro batches
#      of 4 per rank and epoch, one step each, 10 steps in all


def pretrain(tmp, out, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "pretrain.py"), "--config", str(tmp / "pipe.yaml"),
           "--output-dir", str(out), *args]
    p = forkserver.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def test_pipe_shards_device_decode_train_and_resume_exactly(tmp_path):
    src = tmp_path / "folder"
    for i, (name, photo) in enumerate(sorted(demo.photos().items())[:4]):
        (src / f"c{i}").mkdir(parents=True)
        for k in range(10):
            photo.resize((48 + 4 * k, 40 + 3 * k), box=(20 * k, 10 * k, 200 + 20 * k, 160 + 10 * k)).save(
                src / f"c{i}" / f"{k}.jpg", quality=90)
    convert(str(src), str(tmp_path / "shards"), shard_size=10, progress=False)
    (tmp_path / "pipe.yaml").write_text(RECIPE.format(shards=tmp_path / "shards"))
    pretrain(tmp_path, tmp_path / "straight")
    pretrain(tmp_path, tmp_path / "resumed", "--max-steps", "4")  # stops in epoch 0, at batch 4 of 5
    assert "at step 4 (epoch 0, batch 4)" in pretrain(tmp_path, tmp_path / "resumed")
    a, b = (load_file(str(tmp_path / d / "model_fp32.safetensors")) for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
