"""``compile_loss`` / ``compile_options``: the compiled head step gives the eager numbers, is
really compiled, follows a deep copy, survives pickling, and bad options are refused."""

from __future__ import annotations

import copy
import pickle
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import REPO
from hug_lightning.backbones import SmallConvNet
from hug_lightning.compiling import HeadStep, check_compile_options
from hug_lightning.heads import CrossEntropyHead, HUGHead
from hug_lightning.module import ClassifierModule

HEADS = {
    "ce": partial(CrossEntropyHead, label_smoothing=0.1),
    "mhe": HUGHead,
    "mhe_check_labels": partial(HUGHead, check_labels=True),  # the check stays out of the graph
    "mhs_soft_sq": partial(HUGHead, variant="mhs", mhs_mode="soft", intra_power=2,
                           detach_proxy=False),
    "mgd_per_sample": partial(HUGHead, variant="mgd", intra_reduction="per_sample", beta=3.0),
}


def _module(head, **kwargs) -> ClassifierModule:
    torch.manual_seed(0)
    return ClassifierModule(backbone=SmallConvNet(width=4), head=head, num_classes=5,
                            embedding_dim=6, **kwargs)


def _step(module: ClassifierModule, x, y) -> tuple[dict, dict]:
    """One shared training step's outputs and the gradients of every parameter."""
    module.zero_grad()
    out = module.step((x, y), "train")
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_compiled_head_step_equals_eager_in_one_graph(name):
    """fullgraph=True: any graph break (a .item(), a data-dependent shape) is an error."""
    torch._dynamo.reset()
    counters.clear()
    x, y = torch.randn(12, 3, 8, 8), torch.tensor([0, 1, 1, 3, 3, 3, 4, 0, 1, 1, 4, 4])
    eager = _module(HEADS[name])
    fast = _module(HEADS[name], compile_loss=True,
                   compile_options={"backend": "aot_eager", "fullgraph": True})
    ref, ref_grads = _step(eager, x, y)
    got, got_grads = _step(fast, x, y)
    assert counters["stats"]["unique_graphs"] >= 1  # dynamo did trace the head's step
    assert fast.head_step.compiled and not eager.head_step.compiled
    for key in ("loss", "logits"):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    assert got["terms"].keys() == ref["terms"].keys()
    for key in ref["terms"]:
        torch.testing.assert_close(got["terms"][key], ref["terms"][key], rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == ref_grads.keys() and ref_grads
    for key in ref_grads:
        torch.testing.assert_close(got_grads[key], ref_grads[key], rtol=1e-5, atol=1e-6)


def test_check_labels_of_a_compiled_hug_step_is_done_by_the_module_on_every_batch(monkeypatch):
    """On a GPU the module checks labels on the first batch only; a compiled HUG step with
    check_labels cannot check them itself, so the module does, on every batch."""
    import hug_lightning.module as module_file

    calls = []
    monkeypatch.setattr(module_file, "check_labels",
                        lambda y, k, stage, always=False: calls.append(always))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    options = {"backend": "aot_eager", "fullgraph": True}
    for check, compiled, want in ((True, True, [True, True]), (True, False, [True, False]),
                                  (False, True, [True, False])):
        calls.clear()
        module = _module(partial(HUGHead, check_labels=check), compile_loss=compiled,
                         compile_options=options if compiled else None)
        for _ in range(2):
            module.step((x, y), "train")
        assert calls == want, (check, compiled)


def test_a_deep_copy_trains_its_own_head_and_pickling_drops_the_compiled_function():
    """Weight averaging deep-copies the module: the copy's step must read the copy's proxies."""
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    module = _module(HUGHead, compile_loss=True, compile_options={"backend": "aot_eager"})
    module.step((x, y), "train")  # builds the compiled function
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.head.proxies.mul_(-1.0).add_(0.3)
    eager_twin = copy.deepcopy(twin)
    eager_twin.head_step = HeadStep(None)
    want = eager_twin.step((x, y), "train")["loss"]
    torch.testing.assert_close(twin.step((x, y), "train")["loss"], want)
    assert not torch.allclose(module.step((x, y), "train")["loss"], want)
    state = pickle.loads(pickle.dumps(module.head_step))
    assert state.options == {"backend": "aot_eager"} and state._compiled == {}


def test_compile_options_are_checked():
    assert check_compile_options(None, True, False) == {}
    assert check_compile_options({"dynamic": False}, False, True) == {"dynamic": False}
    with pytest.raises(ValueError, match=r"no argument \['dynmic'\].*'dynamic'"):
        _module(CrossEntropyHead, compile=True, compile_options={"dynmic": False})
    with pytest.raises(ValueError, match="nothing is compiled: also set compile"):
        _module(CrossEntropyHead, compile_options={"mode": "max-autotune"})
    with pytest.raises(ValueError, match="must be a mapping"):
        check_compile_options(["dynamic"], True, True)  # type: ignore[arg-type]


def test_the_command_takes_compile_loss_and_its_options(tmp_path):
    """From YAML/flags to the module, trained and evaluated (compiled in train and eval mode)."""
    args = ["--config", "ufm_hug", "--trainer.logger.init_args.save_dir", str(tmp_path),
            "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1",
            "--data.init_args.samples_per_class", "4",
            "--data.init_args.steps_per_epoch", "2", "--model.init_args.backbone.init_args.dim",
            "8", "--model.init_args.compile_loss", "true", "--model.init_args.compile_options",
            "{backend: aot_eager, dynamic: false}"]
    code = ("import sys; from hug_lightning.cli import main; from torch._dynamo.utils import "
            "counters; cli = main(sys.argv[1:]); "
            "print('GRAPHS', counters['stats']['unique_graphs'], cli.model.head_step.options)")
    proc = subprocess.run([sys.executable, "-c", code, "fit", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("GRAPHS"))
    assert int(line.split()[1]) >= 2, line  # the training step and the validation step
    assert "'backend': 'aot_eager', 'dynamic': False" in line


@pytest.mark.slow
def test_inductor_compiled_loss_and_backbone_equal_eager():
    """The default backend (inductor, C++ kernels on the CPU): same numbers as eager."""
    torch._dynamo.reset()
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 5
    ref, ref_grads = _step(_module(HUGHead), x, y)
    got, got_grads = _step(_module(HUGHead, compile=True, compile_loss=True), x, y)
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    for key in ref_grads:
        torch.testing.assert_close(got_grads[key], ref_grads[key], rtol=1e-4, atol=1e-5)
