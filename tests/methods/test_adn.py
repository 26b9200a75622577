import json
from pathlib import Path

import pytest
import torch

from marbench.converters import hu_to_adn
from marbench.files import sha256_file
from marbench.methods.adn import ADN, ADNGenerator, PatchDiscriminator

OFFICIAL = json.loads((Path(__file__).parents[1] / "data" / "official_state_dicts.json").read_text())["adn"]


def _layout(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_generator_and_discriminators_have_the_official_keys_and_shapes():
    assert _layout(ADNGenerator()) == OFFICIAL["model_g"]
    assert _layout(PatchDiscriminator()) == OFFICIAL["model_dl"]
    model = ADN()
    assert _layout(model.model_dh) == OFFICIAL["model_dl"]


def test_official_checkpoint_layout_loads_and_reproduces_the_forward_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    source = ADN(base_ch=8)
    path = tmp_path / "deep_lesion_49.pt"
    torch.save({"model_g": source.model_g.state_dict(), "model_dl": source.model_dl.state_dict(),
                "model_dh": source.model_dh.state_dict(), "model_g.optimizer": {}}, path)
    torch.manual_seed(1)
    loaded = ADN(base_ch=8, checkpoint=str(path), checkpoint_sha256=sha256_file(path)).eval()
    x = torch.rand(2, 1, 32, 32) * 3000 - 1000
    assert torch.equal(loaded(x), source.eval()(x))


def test_checkpoint_errors_name_the_file_and_the_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt not found.*deep_lesion_49\.pt.*liaohaofu/adn"):
        ADN(base_ch=8, checkpoint=str(tmp_path / "missing.pt"))
    path = tmp_path / "other.pt"
    torch.save({"model_g": ADNGenerator(base_ch=16).state_dict()}, path)
    with pytest.raises(ValueError, match="sha256 .* differs"):
        ADN(base_ch=8, checkpoint=str(path), checkpoint_sha256="0" * 64)
    with pytest.raises(ValueError, match=r"other\.pt:model_g: state dict does not match ADNGenerator.*shape differs"):
        ADN(base_ch=8, checkpoint=str(path))


def test_unknown_loss_weights_are_refused():
    with pytest.raises(ValueError, match=r"unknown ADN loss weights \['l2'\]"):
        ADN(loss_weights={"l2": 1.0})


def _crop(batch, n=2, size=64):
    """The first ``n`` slices, central ``size`` x ``size`` crop: a fast single batch for learning checks."""
    lo = (batch["ma_image"].shape[-1] - size) // 2
    return {k: (v[:n, :, lo:lo + size, lo:lo + size] if torch.is_tensor(v) and v.ndim == 4 else v[:n])
            for k, v in batch.items()}


def test_adn_overfits_one_batch(tiny_batch, fit_on_one_batch):
    batch = _crop(tiny_batch[1])
    torch.manual_seed(0)
    # the GAN terms settle near an equilibrium, not zero: the learning check runs the generator's L1 terms alone
    model = ADN(base_ch=8, num_residual=2, ndf=8, lr=2e-3, weight_decay=0.0, loss_weights={"gl": 0.0, "gh": 0.0})
    x_low, x_high = hu_to_adn(batch["ma_image"]), hu_to_adn(batch["gt_image"]).roll(1, dims=0)

    def training_loss():
        with torch.no_grad():
            losses, _, _ = model.generator_losses(x_low, x_high)
        return sum(model.weights[k] * v for k, v in losses.items()).item()

    first = training_loss()
    fit_on_one_batch(model, batch, 300)
    assert training_loss() < first / 10  # measured: 38.1 -> 3.6 after 200 steps


def test_a_training_step_updates_the_generator_and_both_discriminators(tiny_batch, fit_on_one_batch):
    batch = _crop(tiny_batch[1], size=32)
    torch.manual_seed(0)
    model = ADN(base_ch=8, num_residual=1, ndf=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit_on_one_batch(model, batch, 1)
    for net in ("model_g", "model_dl", "model_dh"):
        key = f"{net}.{next(iter(getattr(model, net).state_dict()))}"
        assert not torch.equal(model.state_dict()[key], before[key]), net
