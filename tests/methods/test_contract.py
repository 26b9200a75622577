"""One contract every registered method passes (as torchmetrics' MetricTester runs every metric and deepinv's
operator list runs every physics operator): the output's shape, dtype, range and determinism, the metal pixels
where the card says they are put back, that the card's declared inputs suffice and that a missing one is named.

Each method is built with ``contract_instance()`` (small on CPU) and left untrained: the contract is about the
interface, the learning checks live in each method's own tests.
"""
import pytest
import torch

from marbench.method import METHODS

NAMES = METHODS.names()


@pytest.fixture(scope="module")
def contract_batch(tiny_batch):
    """Four 128 x 128 body slices of the tiny benchmark with every key a dataset provides; the ArtifactGSI keys of
    volume-input methods (``marbench.datasets.artifactgsi``) are added: a stack of three copies of the slice and
    the implant type ``none``."""
    _, batch = tiny_batch
    ma = batch["ma_image"]
    return {**batch, "ma_stack": ma.repeat(1, 3, 1, 1), "implant_index": torch.zeros(ma.shape[0], dtype=torch.int64)}


@pytest.fixture(scope="module")
def instances():
    torch.manual_seed(0)
    return {name: METHODS.get(name).contract_instance().eval() for name in NAMES}


def _only(batch: dict, keys) -> dict:
    return {k: v for k, v in batch.items() if k in keys}


@pytest.mark.parametrize("name", NAMES)
def test_declared_inputs_suffice_and_the_output_is_hu_on_the_input_grid(name, instances, contract_batch):
    method = instances[name]
    card = method.card
    assert "gt_image" not in card.inputs or name == "clean-image", \
        f"{name}: inference must not read the ground truth (declare it in training_inputs)"
    batch = _only(contract_batch, card.inputs)
    with torch.no_grad():
        out = method.predict_step(batch)
    assert out.shape == contract_batch["gt_image"].shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    ma = contract_batch["ma_image"]
    # the metal-affected input itself spans dark streaks far below air and metal far above bone
    lo, hi = min(float(ma.min()), -1024.0) - 1000, max(float(ma.max()), 3071.0) + 1000
    assert lo < out.min() and out.max() < hi, f"{name}: [{float(out.min()):.0f}, {float(out.max()):.0f}] HU"
    if card.puts_metal_back:
        metal = contract_batch["metal_mask"]
        assert metal.any() and torch.equal(out[metal], ma[metal]), f"{name}: metal is not put back"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_on_cpu_in_eval_mode(name, instances, contract_batch):
    method = instances[name]
    batch = _only(contract_batch, method.card.inputs)
    with torch.no_grad():
        first, second = method.predict_step(batch), method.predict_step(batch)
    assert torch.equal(first, second), f"{name}: two evaluations of the same batch differ"


@pytest.mark.parametrize("name", NAMES)
def test_a_missing_input_is_named(name, instances, contract_batch):
    method = instances[name]
    for key in method.card.inputs:
        batch = _only(contract_batch, [k for k in method.card.inputs if k != key] + ["ma_image", "gt_image"])
        if key in ("ma_image", "gt_image"):
            batch.pop(key)
        with pytest.raises(ValueError, match=rf"method '{method.card.name}' needs batch keys \['{key}'\]"):
            method.predict_step(batch)


@pytest.mark.parametrize("name", NAMES)
def test_the_card_is_complete(name):
    cls = METHODS.get(name)
    card = cls.card
    assert card.paper and card.metal
    assert card.trainable or not card.training_inputs
    assert not set(card.inputs) & set(card.training_inputs)
    for table in cls.paper_tables:
        labels = [label for _, label in table.rows]
        assert set(labels) == set(table.values), f"{table.name}: rows and paper values name different rows"
