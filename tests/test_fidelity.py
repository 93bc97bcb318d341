"""The fidelity choices pinned to what the reference code did (yueatsprograms/Stochastic_Depth for
CIFAR/SVHN, facebookarchive/fb.resnet.torch for ImageNet), and to the paper's text for fidelity=paper.

Each expected value below is computed by hand from the reference's own formula (quoted in the
comment), not by the code under test.
"""

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sdrun import fidelity
from sdrun.report.collect import find_runs, group_runs
from sdrun.config import validate
from sdrun.launch.compose import compose
from sdrun.data.batches import Normalizer
from sdrun.engine.evaluate import Evaluator
from sdrun.data.imagenet import PCA_EIGVAL, PCA_EIGVEC, ColorAugment, color_jitter, lighting
from sdrun.model.resnet import CifarResNet, PadShortcut, model_for
from sdrun.report.tables import table1_rows
from sdrun.engine.schedule import epochs_per_lr, lr_at
from tests.run_fixtures import write_run


def composed(*overrides: str):
    cfg = compose(*overrides)
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- presets

def test_reference_is_the_default_and_paper_one_override_away():
    ref, paper = composed("dataset=cifar10"), composed("dataset=cifar10", "fidelity=paper")
    assert fidelity.summary(ref) == {"preset": "reference", "choices": {
        "model.bn_init": "uniform", "model.shortcut_pool": "subsample", "model.conv_init": "fan_in",
        "model.fc_bias": "default", "optim.epoch_base": "one", "dataset.std_rule": "raw",
        "dataset.normalization": "pixel", "select_from": "steps"}}
    assert fidelity.summary(paper)["preset"] == "paper"
    assert fidelity.summary(paper)["choices"]["model.shortcut_pool"] == "avg"
    # each choice on its own: one key changed is a "mixed" run, and a preset can still set single keys
    mixed = composed("dataset=cifar10", "model.bn_init=ones")
    assert fidelity.summary(mixed)["preset"] == "mixed" and mixed.model.shortcut_pool == "subsample"
    # ImageNet: both presets are fb.resnet.torch's recipe (the dataset file comes after the group)
    for choice in ("reference", "paper"):
        cfg = composed("dataset=imagenet", f"fidelity={choice}")
        assert fidelity.summary(cfg) == {"preset": "both", "choices": {
            "model.bn_init": "ones", "model.conv_init": "fan_out", "model.fc_bias": "zero",
            "optim.epoch_base": "zero", "dataset.color_jitter": 0.4, "dataset.lighting": 0.1}}


@pytest.mark.parametrize("override,allowed", [("model.bn_init=uniformm", "uniform"),
                                              ("model.shortcut_pool=max", "subsample"),
                                              ("optim.epoch_base=2", "zero"), ("select_from=epochs", "steps")])
def test_choices_are_enums_so_a_typo_is_refused(override, allowed):
    with pytest.raises(Exception, match=override.replace(".", r"\.")) as e:
        composed(override)
    assert allowed in str(e.value.__cause__)  # OmegaConf's message lists the valid values


# ---------------------------------------------------------------- BatchNorm gamma

def bn_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    return torch.cat([m.weight.detach() for m in bns]), torch.cat([m.bias.detach() for m in bns])


def test_bn_gamma_is_uniform_0_1_like_torch7_reset_and_ones_for_the_paper():
    # Torch7 nn.BatchNormalization:reset(): self.weight:uniform() (U(0, 1)), self.bias:zero()
    torch.manual_seed(0)
    gamma, beta = bn_params(CifarResNet(110, 10, bn_init="uniform"))
    assert gamma.numel() == 16 + 2 * (16 * 18 + 32 * 18 + 64 * 18)  # stem + two BNs per block: 4048
    assert gamma.min() >= 0 and gamma.max() <= 1
    assert abs(gamma.mean().item() - 0.5) < 0.02               # U(0,1): mean 1/2, se 0.0045
    assert abs(gamma.var().item() - 1 / 12) < 0.01             # variance 1/12
    assert gamma.min() < 0.01 and gamma.max() > 0.99           # spread over the whole interval
    assert torch.all(beta == 0)
    gamma, beta = bn_params(CifarResNet(110, 10, bn_init="ones"))
    assert torch.all(gamma == 1) and torch.all(beta == 0)


def first_and_other_bns(model) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gamma of each residual branch's first BatchNorm, gamma of every other BatchNorm, all betas."""
    first = [next(m for m in b.branch.modules() if isinstance(m, nn.BatchNorm2d)) for b in model.blocks]
    others = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and all(m is not f for f in first)]
    return (torch.cat([m.weight.detach() for m in first]), torch.cat([m.weight.detach() for m in others]),
            bn_params(model)[1])


def test_bn_first_normal_is_the_first_commits_init():
    # ResidualDrop.lua at the reference's first commit (8580ac7c): the branch's first
    # cudnn.SpatialBatchNormalization gets :init('weight', nninit.normal, 1.0, 0.002) and
    # :init('bias', nninit.constant, 0); nninit.normal is tensor:normal(mean, stdv), so 0.002 is
    # the std. The second BN and the stem's stay plain: reset()'s weight:uniform(), bias:zero().
    torch.manual_seed(0)
    first, others, beta = first_and_other_bns(CifarResNet(110, 10, bn_init="first_normal"))
    assert first.numel() == 16 * 18 + 32 * 18 + 64 * 18 and others.numel() == 16 + first.numel()  # 2016, 2032
    assert abs(first.mean().item() - 1) < 3e-4                 # se of the mean 0.002 / sqrt(2016) = 4.5e-5
    assert abs(first.std().item() - 0.002) < 2e-4              # se of the std 0.002 / sqrt(2 * 2015) = 3.2e-5
    assert first.min() > 1 - 0.002 * 6 and first.max() < 1 + 0.002 * 6
    assert others.min() >= 0 and others.max() < 1              # U(0, 1), as bn_init=uniform
    assert abs(others.mean().item() - 0.5) < 0.03 and abs(others.var().item() - 1 / 12) < 0.01
    assert torch.all(beta == 0)
    # The global generator (seeded with the run's seed before the model is built) draws it all:
    # same seed, same weights; another seed, others.
    built = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        built.append(CifarResNet(20, 10, bn_init="first_normal").state_dict())
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0])
    assert not torch.equal(built[0]["blocks.0.branch.1.weight"], built[2]["blocks.0.branch.1.weight"])
    # Through the config, and the same rule in the ImageNet family: the first BN of each
    # residual branch (a bottleneck's after the 1x1 reduction); the projection shortcut's BN is U(0, 1).
    torch.manual_seed(0)
    first, others, _ = first_and_other_bns(model_for(composed("dataset=cifar10", "depth=20",
                                                              "model.bn_init=first_normal")))
    assert abs(first.mean().item() - 1) < 1e-3 and first.std().item() < 0.003 and others.max() < 1
    torch.manual_seed(0)
    first, others, _ = first_and_other_bns(model_for(compose("dataset=imagenet", "depth=50", "dataset.num_classes=10",
                                                             "model.bn_init=first_normal")))
    assert first.numel() == 64 * 3 + 128 * 4 + 256 * 6 + 512 * 3
    assert abs(first.mean().item() - 1) < 3e-4 and abs(first.std().item() - 0.002) < 2e-4
    assert others.min() >= 0 and others.max() < 1 and abs(others.mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match="expected one of uniform, ones, first_normal"):
        CifarResNet(20, 10, bn_init="normal")


def first_stage2_conv_std(model: nn.Module) -> float:
    """The std of the first convolution of stage 2 (16 -> 32 channels, 3x3): fan-in 9*16, fan-out 9*32."""
    return model.blocks[3].branch[0].weight.std().item()


# One model key of the reference preset (the default) changed at a time, and how the built network
# shows it: model_for must follow each choice, and fidelity=paper must reach it through the preset.
CHOICES = [
    pytest.param("model.bn_init=ones", lambda m: bool(torch.all(bn_params(m)[0] == 1)), id="bn_init"),
    pytest.param("model.shortcut_pool=avg", lambda m: m.blocks[3].shortcut.pool == "avg", id="shortcut_pool"),
    pytest.param("model.conv_init=fan_out",
                 lambda m: first_stage2_conv_std(m) == pytest.approx(math.sqrt(2 / (9 * 32)), rel=0.05),
                 id="conv_init"),
    pytest.param("model.fc_bias=zero", lambda m: bool(torch.all(m.fc.bias == 0)), id="fc_bias"),
]


@pytest.mark.parametrize("override,shows", CHOICES)
def test_model_for_builds_each_choice_the_config_makes(override, shows):
    torch.manual_seed(0)
    reference = model_for(composed("dataset=cifar10", "depth=20"))
    # The reference's network: gamma ~ U(0, 1), subsampling shortcuts, fan-in init, Linear's own bias.
    gamma, _ = bn_params(reference)
    assert gamma.min() >= 0 and gamma.max() <= 1 and not torch.all(gamma == 1)
    assert reference.blocks[3].shortcut.pool == "subsample"
    assert first_stage2_conv_std(reference) == pytest.approx(math.sqrt(2 / (9 * 16)), rel=0.05)
    assert reference.fc.bias.abs().max() > 0
    assert not shows(reference)
    assert shows(model_for(composed("dataset=cifar10", "depth=20", override)))


def test_model_for_builds_the_paper_presets_network():
    paper = model_for(composed("dataset=cifar10", "depth=20", "fidelity=paper"))
    assert torch.all(bn_params(paper)[0] == 1) and paper.blocks[3].shortcut.pool == "avg"


def test_fb_init_fan_out_and_zero_fc_bias():
    torch.manual_seed(0)
    model = CifarResNet(20, 10, conv_init="fan_out", fc_bias="zero")
    conv = model.blocks[8].branch[0]  # 64 -> 64 channels, 3x3: fb's N(0, sqrt(2 / (3*3*64)))
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 64)), rel=0.05)
    first = model.blocks[3].branch[0]  # 16 -> 32: fan-out 9*32 differs from fan-in 9*16
    assert first.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 32)), rel=0.05)
    assert torch.all(model.fc.bias == 0)
    default = CifarResNet(20, 10)
    assert default.fc.bias.abs().max() > 0 and default.fc.bias.abs().max() <= 1 / math.sqrt(64)


# ---------------------------------------------------------------- transition shortcut

def test_subsampling_shortcut_keeps_every_other_pixel_and_pads_zero_channels():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    out = PadShortcut(3, 5, 2, "subsample")(x)
    assert out.shape == (2, 5, 2, 2)
    # nn.SpatialAveragePooling(1, 1, 2, 2): 1x1 windows at 1-based rows/cols 1, 3 = 0-based 0, 2
    for r in range(2):
        for c in range(2):
            assert torch.equal(out[:, :3, r, c], x[:, :, 2 * r, 2 * c])
    assert torch.all(out[:, 3:] == 0)  # nn.Padding(1, 2, 3): new channels appended, zero
    avg = PadShortcut(3, 5, 2, "avg")(x)
    assert avg[0, 0, 0, 0] == (x[0, 0, 0, 0] + x[0, 0, 0, 1] + x[0, 0, 1, 0] + x[0, 0, 1, 1]) / 4
    assert not torch.equal(avg[:, :3], out[:, :3])


# ---------------------------------------------------------------- learning-rate drops

def reference_lr(epoch: int, max_epochs: int, fractions: tuple[float, float]) -> float:
    """main.lua: epochCounter from 1; 0.1 while < max*f1, 0.01 while < max*f2, else 0.001."""
    if epoch < max_epochs * fractions[0]:
        return 0.1
    if epoch < max_epochs * fractions[1]:
        return 0.01
    return 0.001


@pytest.mark.parametrize("dataset,fractions,one,zero", [
    ("cifar10", (0.5, 0.75), [249, 125, 126], [250, 125, 125]),   # lrSchedule cifar10 = {0.5, 0.75}
    ("cifar100", (0.5, 0.75), [249, 125, 126], [250, 125, 125]),
    ("svhn", (0.6, 0.7), [29, 5, 16], [30, 5, 15]),              # lrSchedule svhn = {0.6, 0.7}
])
def test_epochs_at_each_lr(dataset, fractions, one, zero):
    ref = composed(f"dataset={dataset}")
    paper = composed(f"dataset={dataset}", "fidelity=paper")
    assert epochs_per_lr(ref.epochs, ref.optim) == list(zip((0.1, 0.01, 0.001), one))
    assert epochs_per_lr(paper.epochs, paper.optim) == list(zip((0.1, 0.01, 0.001), zero))
    # epoch by epoch, the reference rule equals main.lua's
    for e in range(ref.epochs):
        assert lr_at(e, ref.optim) == pytest.approx(reference_lr(e + 1, ref.epochs, fractions))


def test_imagenet_schedule_is_fb_resnet_torch():
    cfg = composed("dataset=imagenet", "epochs=120")
    for e in range(120):  # train.lua: LR * 0.1^floor((epoch - 1) / 30), epoch from 1
        assert lr_at(e, cfg.optim) == pytest.approx(0.1 * 0.1 ** ((e + 1 - 1) // 30))


def test_warmup_is_unchanged_by_the_epoch_base():
    cfg = composed("experiment=resnet1202")
    assert [lr_at(e, cfg.optim) for e in (0, 9)] == [0.01, 0.01]
    assert lr_at(10, cfg.optim) == 0.1
    # warm-up, then drops at the 1-based epochs 150 and 225
    assert epochs_per_lr(300, cfg.optim) == [(0.01, 10), (0.1, 139), (0.01, 75), (0.001, 76)]


# ---------------------------------------------------------------- normalisation

def test_std_rules_on_a_hand_computed_fixture():
    # two 1-channel 1x2 images: [0, 2] and [4, 6]
    images = torch.tensor([[[[0, 2]]], [[[4, 6]]]], dtype=torch.uint8)
    ref = Normalizer.fit(images, "raw")
    # per-pixel mean [2, 4]; raw values 0 2 4 6 around their mean 3: (9+1+1+9)/(4-1)
    assert ref.mean.flatten().tolist() == [2.0, 4.0]
    assert ref.std == pytest.approx(math.sqrt(20 / 3), rel=1e-12)
    paper = Normalizer.fit(images, "centred")
    # around the per-pixel mean: -2 -2 2 2, population: 16 / 4
    assert paper.std == pytest.approx(2.0, rel=1e-12)
    # per channel (fb.resnet.torch style): channel 0 = [0, 2, 4, 6], channel 1 = [10, 10, 10, 30]
    two = torch.tensor([[[[0, 2]], [[10, 10]]], [[[4, 6]], [[10, 30]]]], dtype=torch.uint8)
    ch = Normalizer.fit(two, "centred", "channel")
    assert ch.mean.flatten().tolist() == [3.0, 15.0]
    # stored in float32 (the dtype it divides in)
    assert ch.std.flatten().tolist() == pytest.approx([math.sqrt(20 / 4), math.sqrt(300 / 4)], rel=1e-6)
    out = ch(two)
    assert out[:, 1].flatten().tolist() == pytest.approx([(v - 15) / math.sqrt(75) for v in (10, 10, 10, 30)])


@pytest.mark.parametrize("n", [300, 1000])  # not a multiple of the 256-image blocks
def test_fast_fit_equals_a_float64_computation(n):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    x = images.double()
    mean = x.mean(0)
    fast_raw, fast_centred = Normalizer.fit(images, "raw", chunk=384), Normalizer.fit(images, "centred", chunk=384)
    assert torch.allclose(fast_raw.mean.double(), mean, rtol=1e-6)
    assert fast_raw.std == pytest.approx(x.std().item(), rel=1e-9)  # Torch7 std(): n - 1, global mean
    assert fast_centred.std == pytest.approx(((x - mean) ** 2).mean().sqrt().item(), rel=1e-9)
    # the extreme values 0 and 255 stay exact (partial sums below 2^24)
    full = torch.full((600, 1, 2, 2), 255, dtype=torch.uint8)
    assert Normalizer.fit(full, "raw").mean.flatten().tolist() == [255.0] * 4


# ---------------------------------------------------------------- SVHN selection

def scripted_evaluator(tmp_path, select_from, val_by_step):
    seen = []

    def error_of(name):
        step = seen[-1]
        return (val_by_step[step], None) if name == "val" else (100.0 + step, None)

    ev = Evaluator(error_of, True, 200, False, lambda: None, select_from=select_from)
    return ev, seen


@pytest.mark.parametrize("select_from,best_step", [("steps", 400), ("steps_and_epochs", 300)])
def test_svhn_selection_candidates(tmp_path, select_from, best_step):
    # 300 steps an epoch, a step evaluation every 200 global steps (main.lua: iterCounter % 200 == 0),
    # epoch ends at 300 and 600. The lowest validation error is at the first epoch end (step 300),
    # which the reference never evaluates: it selects among steps 200, 400, 600.
    val = {200: 5.0, 300: 1.0, 400: 3.0, 600: 4.0}
    ev, seen = scripted_evaluator(tmp_path, select_from, val)
    for step, epoch_end in ((200, False), (300, True), (400, False), (600, True)):
        seen.append(step)
        ev.run(step, step / 300, epoch_end=epoch_end)
    assert ev.best["step"] == best_step and ev.best["test_error_pct"] == 100.0 + best_step
    assert ev.is_candidate(600, epoch_end=True)  # an epoch end on a multiple of 200 is a step evaluation


def test_epoch_ends_compete_before_the_first_step_evaluation(tmp_path):
    ev, seen = scripted_evaluator(tmp_path, "steps", {50: 9.0, 100: 8.0})
    for step in (50, 100):
        seen.append(step)
        ev.run(step, step / 50, epoch_end=True)
    assert ev.best["step"] == 100  # a run shorter than eval_every_steps still selects something


# ---------------------------------------------------------------- ImageNet colour jitter and lighting

GREY = (0.299, 0.587, 0.114)


def fb_jitter_one(img: torch.Tensor, order: list[int], alphas: list[float]) -> torch.Tensor:
    """fb.resnet.torch transforms.lua, one image, written out: blend(img, gs, a) = img*a + (1-a)*gs."""
    img = img.clone().double()
    for op in order:
        a = alphas[op]
        grey = GREY[0] * img[0] + GREY[1] * img[1] + GREY[2] * img[2]
        if op == 0:      # Brightness: gs = zeros
            gs = torch.zeros_like(img)
        elif op == 1:    # Contrast: gs = grayscale, filled with the mean of its first channel
            gs = torch.full_like(img, grey.mean().item())
        else:            # Saturation: gs = grayscale image in all three channels
            gs = grey.expand_as(img)
        img = img * a + gs * (1 - a)
    return img


def fb_lighting_one(img: torch.Tensor, alpha: list[float]) -> torch.Tensor:
    """transforms.lua Lighting: rgb = eigvec:cmul(alpha expanded):cmul(eigval expanded):sum(2)."""
    out = img.clone().double()
    for i in range(3):
        out[i] += sum(PCA_EIGVEC[i][j] * alpha[j] * PCA_EIGVAL[j] for j in range(3))
    return out


def fixed_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 5, 6, generator=g, dtype=torch.float64)  # [0, 1] units, as image.load(..., 'float')


def test_jitter_and_lighting_equal_fb_formulas_written_out():
    img = fixed_image()
    orders = [[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]]
    alphas = [[1.3, 0.7, 1.1], [0.6, 1.4, 0.9], [1.0, 1.2, 0.65], [0.8, 0.9, 1.35]]
    batch = img.expand(4, -1, -1, -1)
    got = color_jitter(batch, torch.tensor(orders), torch.tensor(alphas, dtype=torch.float64))
    for n in range(4):
        assert torch.allclose(got[n], fb_jitter_one(img, orders[n], alphas[n]), atol=1e-12)
    light = [[0.05, -0.1, 0.2], [-0.3, 0.0, 0.1], [0.0, 0.0, 0.0], [0.1, 0.1, 0.1]]
    got = lighting(batch, torch.tensor(light, dtype=torch.float64), unit=1.0)
    for n in range(4):
        assert torch.allclose(got[n], fb_lighting_one(img, light[n]), atol=1e-12)


def test_jitter_and_lighting_statistics_with_a_fixed_seed():
    n = 20000
    aug = ColorAugment(0.4, 0.1, torch.Generator().manual_seed(7))
    order, alphas, alpha = aug.draw(n)
    # RandomOrder: each of the 6 orders about 1/6; each alpha = 1 + U(-0.4, 0.4)
    counts = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and (counts.float() / n - 1 / 6).abs().max() < 0.015
    assert alphas.min() >= 0.6 and alphas.max() <= 1.4 and abs(alphas.mean().item() - 1) < 0.01
    assert alphas.std().item() == pytest.approx(0.8 / math.sqrt(12), rel=0.03)
    # Lighting on a black image: channel i moves by sum_j eigvec[i][j] * N(0, 0.1) * eigval[j]; its
    # std is 0.1 * sqrt(sum_j (eigvec[i][j] * eigval[j])^2) in [0, 1] units, x 255 here
    black = torch.zeros(n, 3, 1, 1, dtype=torch.uint8)
    lit = ColorAugment(0.0, 0.1, torch.Generator().manual_seed(7))
    shift = lit(black, lit.draw(n)).view(n, 3)
    for i in range(3):
        expect = 255 * 0.1 * math.sqrt(sum((PCA_EIGVEC[i][j] * PCA_EIGVAL[j]) ** 2 for j in range(3)))
        assert shift[:, i].std().item() == pytest.approx(expect, rel=0.03)
        assert abs(shift[:, i].mean().item()) < 3 * expect / math.sqrt(n) + 1e-6
    # brightness alone on a fixed image scales it: the mean pixel scales by the drawn factor
    img = (fixed_image() * 255).round().to(torch.uint8)
    jit = ColorAugment(0.4, 0.0, torch.Generator().manual_seed(1))
    o, a, l = jit.draw(1)
    only_brightness = (torch.zeros_like(o), a, l)  # the same op three times: brightness thrice
    out = jit(img[None], only_brightness)
    assert torch.allclose(out, img[None].float() * a[0, 0] ** 3, rtol=1e-5)


# ---------------------------------------------------------------- results.json and sdrun table

def test_table_keeps_runs_that_differ_in_a_fidelity_choice_apart(tmp_path):
    for seed in (1, 2):
        write_run(tmp_path / f"ref{seed}", seed=seed, error=5.0)
        write_run(tmp_path / f"gamma1_{seed}", seed=seed, error=6.0, config={"model.bn_init": "ones"})
        write_run(tmp_path / f"drop{seed}", seed=seed, error=7.0, config={"optim.epoch_base": "zero"})
    runs, skipped = find_runs([tmp_path])
    groups, notes = group_runs(runs)
    assert not skipped and len(runs) == 6
    rows = table1_rows(groups)
    assert sorted((r["n"], r["test_error_pct_mean"]) for r in rows) == [(2, 5.0), (2, 6.0), (2, 7.0)]
    assert any("model.bn_init" in note and "optim.epoch_base" in note for note in notes)
    assert {r["variant"] for r in rows} == {"model.bn_init=uniform, optim.epoch_base=one",
                                            "model.bn_init=ones, optim.epoch_base=one",
                                            "model.bn_init=uniform, optim.epoch_base=zero"}


def test_summary_reads_a_plain_results_config():
    plain = OmegaConf.to_container(composed("dataset=svhn", "fidelity=paper"), enum_to_str=True)
    assert fidelity.summary(plain)["preset"] == "paper"
