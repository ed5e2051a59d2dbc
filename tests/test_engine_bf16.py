"""bf16 on CPU (2 ranks over gloo, ZeRO-2) trains a small MFF on the bundled demo photographs: the loss drops."""
import json
import os
import sys
from pathlib import Path
import forkserver

REPO = Path(__file__).resolve().parents[1]


def test_bf16_cpu_loss_decreases_on_demo_data(tmp_path):
    out = tmp_path / "out"
    sets = ["precision=bf16", "model.img_size=32", "model.patch_size=8", "model.embed_dim=64", "model.depth=4",
            "model.num_heads=2", "model.decoder_embed_dim=64", "model.decoder_depth=1", "model.decoder_num_heads=2",
            "model.out_indices=[1,3]", "data.num_workers=0", "schedule.epochs=3", "schedule.warmup_epochs=0.5",
            "batch.micro_batch=16", "logging.every_steps=6", "logging.image_every_steps=36",
            "checkpoint.every_steps=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "launch" / "pretrain.py"), "--config", str(REPO / "configs" / "demo.yaml"),
           "--output-dir", str(out), *[a for s in sets for a in ("--set", s)]]
    p = forkserver.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    loss = [r["loss"] for r in m]
    print("bf16 losses:", [round(v, 4) for v in loss])
    assert len(loss) == 6 and all(v == v for v in loss)  # 36 steps (400 images / 32 per step x 3 epochs)
    assert loss[-1] < 0.8 * loss[0], loss
    assert sum(m[0][k] for k in m[0] if k.startswith("fusion/w")) == __import__("pytest").approx(1.0, abs=1e-2)
    assert (out / "reconstruction.png").stat().st_size > 0 and (out / "model_fp32.safetensors").exists()
