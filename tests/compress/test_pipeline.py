"""The whole pipeline on a tiny subset of real CIFAR-10 with the real ResNet-20: run directory,
report numbers against direct counts and evaluations, resuming bit for bit, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from helpers_compress import WEIGHTS, cifar_subset, run_main, tiny_recipe
from mfcli.compress import load_compressed
from mfcli.compress.loop import Context
from mfcli.compress.modules import ConvVelocityNet, MeanFlowModule, ModuleSpec
from mfcli.data import images_uint8_to_float
from mftest import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory, resnet_registered):
    from mftest import SHARED_DATA

    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present")
    d = tmp_path_factory.mktemp("cifar")
    npz = cifar_subset(d / "cifar_small.npz")
    return d, npz, next(WEIGHTS.glob("resnet20-*.th"))


def compress(monkeypatch, capsys, recipe, runs_dir, weights, *extra):
    return run_main(monkeypatch, capsys, "compress", "resnet20", "--weights", weights, "--incubate", "1,3",
                    "--recipe", recipe, "--runs-dir", runs_dir, *extra)


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """One uninterrupted run, shared by the tests that read its outputs."""
    d, npz, weights = data
    out = tmp_path_factory.mktemp("full")
    recipe = tiny_recipe(out / "tiny.toml", npz)
    mp = pytest.MonkeyPatch()

    class Cap:  # run_main reads captured output; here a plain stand-in
        def readouterr(self):
            return type("O", (), {"out": "", "err": ""})()

    code, _, err = compress(mp, Cap(), recipe, out / "runs", weights)
    mp.undo()
    assert code == 0, err
    (run,) = (out / "runs").iterdir()
    return run


def test_run_directory_and_phases(full_run):
    assert full_run.name.endswith("-compress-resnet20")
    cfg = json.loads((full_run / "config.json").read_text())
    assert cfg["config"]["invocation"]["incubate"] == [1, 3] and cfg["config"]["task"] == "compress"
    done = json.loads((full_run / "phases.json").read_text())["done"]
    assert list(done) == ["baseline", "eval.baseline", "pairs", "meanflow.stage1", "meanflow.stage2", "meanflow.stage3",
                          "meta", "eval.meta", "incubate.stage1", "incubate.stage3", "finetune", "eval.hybrid", "report"]
    log = [json.loads(line) for line in (full_run / "log.jsonl").read_text().splitlines()]
    steps = {r["phase"] for r in log if "step" in r and "phase" in r}
    assert {"meanflow.stage1", "meta", "incubate.stage3", "finetune"} <= steps
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in log if "loss" in r)
    assert not (full_run / "phase_state.pt").exists()  # cleared once every phase was done


def test_report_equals_direct_counts_and_evaluation(full_run, data):
    _, npz, _ = data
    rep = json.loads((full_run / "report.json").read_text())
    hybrid = load_compressed(full_run / "hybrid.safetensors")
    meta = load_compressed(full_run / "meta.safetensors")
    base = load_compressed(full_run / "baseline.safetensors")
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in (("baseline", base), ("meta", meta), ("hybrid", hybrid))}
    for k, n in counts.items():
        assert rep["models"][k]["params"] == n
        assert rep["models"][k]["reduction_percent"] == pytest.approx(100 * (1 - n / counts["baseline"]), abs=1e-9)
    kinds = [type(s) is MeanFlowModule for s in hybrid.stages]
    assert kinds == [False, True, False]  # stages 1 and 3 incubated, stage 2 kept its module
    assert all(isinstance(s, MeanFlowModule) for s in meta.stages)
    # top-1 recomputed from the saved files on the same test images
    import numpy as np

    arr = np.load(npz)
    x = images_uint8_to_float(torch.from_numpy(arr["x_test"]).permute(0, 3, 1, 2).contiguous())
    y = torch.from_numpy(arr["y_test"].astype(np.int64))
    with torch.no_grad():
        for k, m in (("baseline", base), ("hybrid", hybrid), ("meta", meta)):
            acc = 100.0 * float((m(x).argmax(1) == y).float().mean())
            assert rep["models"][k]["top1"] == pytest.approx(acc, abs=1e-6), k
    assert rep["models"]["baseline"]["top1"] > 80  # the real pretrained ResNet-20 (91.73 % on the full test split)
    assert all(rep["models"][k]["images_per_s"] > 0 for k in counts)


def test_resume_after_interruption_is_bit_identical(full_run, data, tmp_path, monkeypatch, capsys):
    """Stopped inside a MeanFlow phase and again inside the meta fine-tune; resumed each time;
    the saved hybrid equals the uninterrupted run's tensor for tensor."""
    _, npz, weights = data
    recipe = tiny_recipe(tmp_path / "tiny.toml", npz)
    runs_dir = tmp_path / "runs"
    original = Context.write
    stops = [("meanflow.stage2", 3), ("meta", 1)]

    def write(self, record):
        original(self, record)
        if stops and (record.get("phase"), record.get("step")) == stops[0]:
            stops.pop(0)
            self.stop_requested = True  # what Ctrl-C does; it takes effect after the next step

    monkeypatch.setattr(Context, "write", write)
    code, _, err = compress(monkeypatch, capsys, recipe, runs_dir, weights)
    assert code == 130 and "Resume with: mf compress --resume" in " ".join(err.split()), err
    (run,) = runs_dir.iterdir()
    st = torch.load(run / "phase_state.pt", weights_only=True)
    assert st["phase"] == "meanflow.stage2" and st["step"] == 4
    code, _, err = run_main(monkeypatch, capsys, "compress", "--resume", run)
    assert code == 130, err
    st = torch.load(run / "phase_state.pt", weights_only=True)
    assert (st["phase"], st["step"]) == ("meta", 2)
    code, _, err = run_main(monkeypatch, capsys, "compress", "--resume", run)
    assert code == 0, err
    a, b = load_file(str(full_run / "hybrid.safetensors")), load_file(str(run / "hybrid.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    done = json.loads((run / "phases.json").read_text())["done"]
    assert list(done)[-1] == "report"


def test_ctrl_c_in_a_subprocess_saves_a_resumable_checkpoint(data, tmp_path):
    _, npz, weights = data
    recipe = tiny_recipe(tmp_path / "tiny.toml", npz, steps=400)
    runs_dir = tmp_path / "runs"
    env = {**os.environ, "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "mfcli", "compress", "resnet20", "--weights", str(weights), "--incubate", "2",
           "--recipe", str(recipe), "--runs-dir", str(runs_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until the first MeanFlow phase is under way
            logs = list(runs_dir.glob("*/log.jsonl"))
            if logs and '"phase": "meanflow.stage1", "step": 3' in logs[0].read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached meanflow.stage1 step 3")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "stopped in phase meanflow.stage1" in " ".join(err.split())
    (run,) = runs_dir.iterdir()
    st = torch.load(run / "phase_state.pt", weights_only=True)
    assert st["phase"] == "meanflow.stage1" and 3 <= st["step"] < 400
    done = json.loads((run / "phases.json").read_text())["done"]
    assert "pairs" in done and "meanflow.stage1" not in done


def test_online_pairs_per_step_nets_and_no_incubation(data, tmp_path, monkeypatch, capsys):
    """Features recomputed by the frozen baseline at every step, a chain of per-step conv
    velocity nets with their own step budget in the last stage, and --incubate none (the
    hybrid is the meta model, fine-tuned)."""
    _, npz, weights = data
    recipe = tiny_recipe(tmp_path / "tiny.toml", npz, pairs=0, extra="""
        [modules.stage3]
        per_step_nets = true
        net = "conv"
        train_steps = 6
        """)
    code, _, err = run_main(monkeypatch, capsys, "compress", "resnet20", "--weights", weights, "--incubate", "none",
                            "--recipe", recipe, "--runs-dir", tmp_path / "runs")
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    done = json.loads((run / "phases.json").read_text())["done"]
    assert done["pairs"]["mode"] == "online" and not (run / "pairs.safetensors").exists()
    assert not any(k.startswith("incubate") for k in done)
    hybrid = load_compressed(run / "hybrid.safetensors")
    assert all(isinstance(s, MeanFlowModule) for s in hybrid.stages)
    assert len(hybrid.stages[2].nets) == 2 and hybrid.stages[2].spec.per_step_nets
    assert hybrid.stages[2].spec.net == "conv" and isinstance(hybrid.stages[2].nets[0], ConvVelocityNet)
    assert done["meanflow.stage3"]["steps"] == 6 and done["meanflow.stage2"]["steps"] == 4
    rep = json.loads((run / "report.json").read_text())
    assert rep["models"]["hybrid"]["params"] == rep["models"]["meta"]["params"] == sum(p.numel() for p in hybrid.parameters())


@pytest.mark.parametrize("progressive", [True, False])
def test_incubation_order_and_memory_layout(full_run, tmp_path, monkeypatch, progressive):
    """Progressive incubation trains stage 3 behind the already incubated stage 1 (the inputs it
    gets in the hybrid); independent incubation behind stage 1's MeanFlow module. Stage 2 keeps
    its module either way, and the models are in the recipe's memory layout."""
    import shutil

    from mfcli import checkpoint, runs
    from mfcli.compress.pipeline import Compressor, Invocation
    from mfcli.compress.recipe import load_compress_recipe

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    cfg = dict(runs.read_config(run)["config"])
    inv_raw = cfg.pop("invocation")
    cfg["incubate"] = {**cfg["incubate"], "progressive": progressive}
    comp = Compressor(load_compress_recipe("tiny", raw=cfg), Invocation(inv_raw["model"], inv_raw["incubate"], inv_raw["weights"]),
                      run_dir=run, quiet=True)
    seen = {}

    def capture(self, phase, model, cfg, *, trained, set_modes=None):
        set_modes()
        seen.update(phase=phase, model=model, trained=trained)
        return {"steps": 0}

    monkeypatch.setattr(Compressor, "_train_classifier", capture)
    comp.phase_incubate(3)
    model, trained = seen["model"], seen["trained"]
    assert seen["phase"] == "incubate.stage3" and trained is model.stages[2] and not isinstance(trained, MeanFlowModule)
    assert isinstance(model.stages[1], MeanFlowModule)
    if progressive:
        assert not isinstance(model.stages[0], MeanFlowModule)
        want = checkpoint.load_weights(run / "incubate_stage1.safetensors")[0]
        got = model.stages[0].state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    else:
        assert isinstance(model.stages[0], MeanFlowModule)
    assert not any(p.requires_grad for s in (model.stem, model.stages[0], model.stages[1], model.head) for p in s.parameters())
    assert all(p.requires_grad for p in trained.parameters())
    assert not model.stages[0].training and trained.training  # frozen parts keep their BatchNorm statistics
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def _saved_module(path):
    """A MeanFlow module rebuilt from a phase's safetensors file (its spec is in the metadata)."""
    from mfcli import checkpoint

    state, meta = checkpoint.load_weights(path)
    m = MeanFlowModule(ModuleSpec(**meta["spec"]))
    m.load_state_dict(state)
    return m


def _dropin_run(data, tmp_path, monkeypatch, capsys, settings: str):
    """`mf compress resnet20 --incubate 1,3` on the tiny recipe with a 24-step [dropin] phase for
    stage 2 (plus ``settings``, TOML lines of [dropin]) and no meta steps; the run directory."""
    _, npz, weights = data
    recipe = tiny_recipe(tmp_path / "tiny.toml", npz, extra="""
        [dropin]
        steps = 24
        batch_size = 64
        lr = 3e-3
        warmup_steps = 0
        log_every = 1
        ckpt_every = 10
        """ + settings)
    code, _, err = run_main(monkeypatch, capsys, "compress", "resnet20", "--weights", weights, "--incubate", "1,3",
                            "--recipe", recipe, "--runs-dir", tmp_path / "runs", "meta.steps=0")
    assert code == 0, err
    (run,) = (tmp_path / "runs").iterdir()
    return run


def test_dropin_phase_trains_the_module_as_a_drop_in(data, tmp_path, monkeypatch, capsys):
    """[dropin]: the module of every stage that reaches the hybrid (here stage 2, with stages 1
    and 3 incubated) is trained inside the frozen baseline towards the baseline's logits on the
    kept images: the distillation loss of baseline-with-module on those images must fall, and the
    meta model must be built from the drop-in module."""
    import numpy as np

    from mfcli import checkpoint
    from mfcli.compress import arch as A

    _, npz, _ = data
    run = _dropin_run(data, tmp_path, monkeypatch, capsys, "views = 2\ndistill = 1.0")
    done = json.loads((run / "phases.json").read_text())["done"]
    names = list(done)
    assert names.index("meanflow.stage3") < names.index("dropin.stage2") < names.index("meta")
    assert [n for n in names if n.startswith("dropin")] == ["dropin.stage2"]  # incubated stages get none
    assert done["dropin.stage2"]["steps"] == 24 and done["dropin.stage2"]["kept"] == 2 * 512

    base = load_compressed(run / "baseline.safetensors")
    arr = np.load(npz)
    x = images_uint8_to_float(torch.from_numpy(arr["x_train"]).permute(0, 3, 1, 2).contiguous())

    def kl_of(mod):
        net = A.replace_stages(base, {2: mod}).eval()
        with torch.no_grad():
            t = torch.log_softmax(base(x) / 4, 1)
            s = torch.log_softmax(net(x) / 4, 1)
        return float(torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean"))

    before, after = kl_of(_saved_module(run / "meanflow_stage2.safetensors")), kl_of(_saved_module(run / "dropin_stage2.safetensors"))
    assert after < 0.7 * before, (before, after)
    # with meta.steps = 0 the meta model is the assembled one: its stage 2 is the drop-in module
    meta = load_compressed(run / "meta.safetensors")
    want = checkpoint.load_weights(run / "dropin_stage2.safetensors")[0]
    got = meta.stages[1].state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert not torch.equal(want["nets.0.fc3.weight"], checkpoint.load_weights(run / "meanflow_stage2.safetensors")[0]["nets.0.fc3.weight"])
    assert 0 <= done["dropin.stage2"]["teacher_agreement"] <= 100


def test_dropin_feature_weight_pulls_the_pooled_features_to_the_baselines(data, tmp_path, monkeypatch, capsys):
    """[dropin] feature_weight: with only the feature term and the label term (distill = 0), the
    distance between the pooled features of baseline-with-module and the baseline's falls."""
    import numpy as np

    from mfcli.compress import arch as A

    _, npz, _ = data
    run = _dropin_run(data, tmp_path, monkeypatch, capsys, "distill = 0.0\nfeature_weight = 10.0")
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all("feat_se" in r for r in logs if r.get("phase") == "dropin.stage2" and "loss" in r)
    base = load_compressed(run / "baseline.safetensors")
    x = images_uint8_to_float(torch.from_numpy(np.load(npz)["x_train"]).permute(0, 3, 1, 2).contiguous())

    def distance(name):
        net = A.replace_stages(base, {2: _saved_module(run / name)}).eval()
        with torch.no_grad():
            return float((net.features(x) - base.features(x)).pow(2).sum(1).mean())

    before, after = distance("meanflow_stage2.safetensors"), distance("dropin_stage2.safetensors")
    assert after < 0.7 * before, (before, after)


def test_dropin_data_are_the_baselines_features_and_logits(full_run, tmp_path):
    """The kept inputs of stage k are the frozen baseline's features (view 1: the images
    themselves; view 2: random crops with flips), and the kept logits are the baseline's on
    the same view: head(stages k.. (input)) up to the fp16 storage of the input."""
    import shutil

    import numpy as np

    from mfcli import runs
    from mfcli.compress.pipeline import Compressor, Invocation
    from mfcli.compress.recipe import load_compress_recipe

    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    cfg = dict(runs.read_config(run)["config"])
    inv_raw = cfg.pop("invocation")
    cfg["dropin"] = {**cfg["dropin"], "steps": 1, "views": 2, "num_images": 100, "dtype": "float32"}
    comp = Compressor(load_compress_recipe("tiny", raw=cfg), Invocation(inv_raw["model"], inv_raw["incubate"], inv_raw["weights"]),
                      run_dir=run, quiet=True)
    comp.ctx = Context(run, comp.device, quiet=True)
    inputs, logits, pooled, labels = comp._dropin_data(2)
    assert inputs.shape[0] == logits.shape[0] == pooled.shape[0] == labels.shape[0] == 200 and inputs.shape[1:] == (16, 32, 32)
    base = comp.baseline()
    images, all_labels = comp.train_set.tensors()
    x = images_uint8_to_float(images).contiguous(memory_format=comp.memory_format)
    with torch.no_grad():
        prefix = base.stages[0](base.stem(base.normalize(x)))
        full = base(x)
        rest_pooled = base.head.pooled(base.stages[2](base.stages[1](inputs.contiguous(memory_format=comp.memory_format))))
        rest = base.head.fc(rest_pooled)
    # view 1: a subset of the plain images; find each kept row among them
    dist = torch.cdist(inputs[:100].flatten(1), prefix.flatten(1))
    match = dist.argmin(1)
    assert torch.allclose(inputs[:100], prefix[match], atol=1e-5) and len(set(match.tolist())) == 100
    assert torch.allclose(logits[:100], full[match], atol=1e-4) and torch.equal(labels[:100], all_labels[match].long())
    # view 2: other pixels (crops, flips), the same images and labels, logits consistent with the kept input
    assert (inputs[100:] - inputs[:100]).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.8
    assert torch.equal(labels[100:], labels[:100])
    assert torch.allclose(rest, logits, atol=1e-4)
    # the kept pooled features are the head's input on the same views, and give the kept logits
    assert pooled.shape == (200, base.head.fc.in_features) and torch.allclose(rest_pooled, pooled, atol=1e-4)
    assert torch.allclose(base.head.fc(pooled), logits, atol=1e-5)
    assert np.isfinite(logits.numpy()).all()


@pytest.mark.parametrize("precision, native_bf16", [("bf16", False), ("fp32", True), ("auto", False), ("auto", True)])
def test_precision_autocasts_the_classifier_steps_only(full_run, tmp_path, monkeypatch, precision, native_bf16):
    """run.precision = bf16: the drop-in and fine-tune steps run the model under bf16 autocast;
    the kept drop-in inputs (the baseline's features) and the evaluation are fp32, and the saved
    weights stay fp32; fp32 never autocasts; auto on a CPU autocasts only when the CPU has bf16
    instructions (emulated bf16 is many times slower than fp32)."""
    import shutil

    from mfcli import checkpoint, runs
    from mfcli.compress import pipeline
    from mfcli.compress.pipeline import Compressor, Invocation
    from mfcli.compress.recipe import load_compress_recipe

    monkeypatch.setattr(pipeline, "cpu_has_bf16", lambda: native_bf16)
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    cfg = dict(runs.read_config(run)["config"])
    inv_raw = cfg.pop("invocation")
    cfg["run"] = {**cfg["run"], "precision": precision}
    cfg["dropin"] = {**cfg["dropin"], "steps": 2, "num_images": 64, "batch_size": 32, "dtype": "float32"}
    cfg["finetune"] = {**cfg["finetune"], "steps": 2}
    comp = Compressor(load_compress_recipe("tiny", raw=cfg), Invocation(inv_raw["model"], inv_raw["incubate"], inv_raw["weights"]),
                      run_dir=run, quiet=True)
    comp.ctx = Context(run, comp.device, quiet=True)
    # the kept inputs (view 1) against the fp32 baseline's stage-1 outputs on the same images
    inputs, _, _, _ = comp._dropin_data(2)
    base = comp.baseline()
    images, _ = comp.train_set.tensors()
    with torch.no_grad():
        exact = base.stages[0](base.stem(base.normalize(images_uint8_to_float(images))))
    kept = inputs[:64]
    err = torch.cdist(kept.flatten(1), exact.flatten(1), compute_mode="donot_use_mm_for_euclid_dist").amin(1) / kept.flatten(1).norm(dim=1)
    assert err.max() < 1e-5, err.max()
    seen: list[torch.dtype] = []

    def hook(module, args, out):
        if isinstance(module, MeanFlowModule):
            seen.append(out.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        phases = {}
        for name, fn in (("dropin", lambda: comp.phase_dropin(2)), ("finetune", comp.phase_finetune),
                         ("eval", lambda: comp.phase_eval("hybrid"))):
            seen.clear()
            fn()
            phases[name] = set(seen)
    finally:
        handle.remove()
    train = {torch.bfloat16} if precision == "bf16" or (precision == "auto" and native_bf16) else {torch.float32}
    assert phases == {"dropin": train, "finetune": train, "eval": {torch.float32}}
    for name in ("dropin_stage2.safetensors", "hybrid.safetensors"):
        state = checkpoint.load_weights(run / name)[0]
        floats = [v for v in state.values() if v.is_floating_point()]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in floats)


def test_bf16_on_a_cpu_without_bf16_instructions_warns(full_run, monkeypatch, capsys):
    from mfcli import runs
    from mfcli.compress.pipeline import Compressor, Invocation
    from mfcli.compress.recipe import load_compress_recipe

    cfg = dict(runs.read_config(full_run)["config"])
    inv_raw = cfg.pop("invocation")
    cfg["run"] = {**cfg["run"], "precision": "bf16"}

    def build():
        Compressor(load_compress_recipe("tiny", raw=cfg), Invocation(inv_raw["model"], inv_raw["incubate"], inv_raw["weights"]),
                   run_dir=full_run, device="cpu")
        return capsys.readouterr().err

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert "no bf16 instructions" not in build()
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert "no bf16 instructions" in build()


def test_dropin_loss_against_a_hand_computation():
    """(1-α) CE with label smoothing ε + α T² KL(teacher || student) at temperature T, plus
    w · mean over the batch of the squared distance between pooled features, written out in
    float64 from the definitions, element by element."""
    import math
    from types import SimpleNamespace

    from mfcli.compress.pipeline import dropin_loss

    g = torch.Generator().manual_seed(0)
    B, C, D = 5, 4, 3
    logits, teacher = torch.randn(B, C, generator=g, dtype=torch.float64), torch.randn(B, C, generator=g, dtype=torch.float64)
    pooled, teacher_pooled = torch.randn(B, D, generator=g, dtype=torch.float64), torch.randn(B, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 3, 1, 1, 2])
    cfg = SimpleNamespace(label_smoothing=0.1, distill=0.7, distill_temperature=2.0, feature_weight=0.5)

    def softmax(row, T):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    ce = kl = feat = 0.0
    for i in range(B):
        p = softmax(logits[i].tolist(), 1.0)
        q = [(1 - cfg.label_smoothing) * (c == int(y[i])) + cfg.label_smoothing / C for c in range(C)]
        ce -= sum(qc * math.log(pc) for qc, pc in zip(q, p)) / B
        ps, pt = softmax(logits[i].tolist(), 2.0), softmax(teacher[i].tolist(), 2.0)
        kl += sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps)) / B
        feat += sum((a - b) ** 2 for a, b in zip(pooled[i].tolist(), teacher_pooled[i].tolist())) / B
    want = 0.3 * ce + 0.7 * 4.0 * kl + 0.5 * feat
    assert dropin_loss(logits, pooled, y, teacher, teacher_pooled, cfg).item() == pytest.approx(want, rel=1e-12)
    cfg.feature_weight = 0.0
    assert dropin_loss(logits, pooled, y, teacher, teacher_pooled, cfg).item() == pytest.approx(0.3 * ce + 0.7 * 4.0 * kl, rel=1e-12)
