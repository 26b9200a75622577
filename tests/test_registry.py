"""The one registry type (marbench.registry.Registry) and the registries built on it."""
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import torch

from marbench.method import METHODS, MARMethod, MethodCard
from marbench.registry import Registry

ROOT = Path(__file__).parents[1]


def test_register_get_and_errors_that_list_the_known_names():
    reg = Registry("colour", base=str)
    reg.register("red", "#f00")
    assert reg.get("red") == "#f00" and "red" in reg and reg.names() == ["red"]
    with pytest.raises(KeyError, match=r"unknown colour 'rde'; known: \['red'\]"):
        reg.get("rde")
    with pytest.raises(ValueError, match="colour name 'red' is already registered"):
        reg.register("red", "#ff0000")
    with pytest.raises(TypeError, match="colour 'blue' must be a str"):
        reg.register("blue", 3)
    assert reg.register("red", "#f00") == "#f00"  # the same object again is fine


def test_decorator_and_extra_check():
    def even(name, value):
        if value % 2:
            raise ValueError(f"{name}: odd")

    reg = Registry("number", base=int, check=even)
    assert reg.register("two")(2) == 2
    with pytest.raises(ValueError, match="three: odd"):
        reg.register("three", 3)


def test_every_method_declared_in_pyproject_is_found_in_a_fresh_process():
    """In-tree methods come from the entry points of pyproject.toml, not from imports other tests made."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["marbench.methods"]
    code = "from marbench.method import METHODS; print(' '.join(METHODS.names()))"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(declared) <= set(found)
    for name in declared:
        cls = METHODS.get(name)
        assert issubclass(cls, MARMethod) and cls.card.name == name and cls.card.paper and cls.card.inputs


def test_a_method_whose_card_disagrees_with_its_name_is_refused():
    class Other(MARMethod):
        card = MethodCard(name="other", paper="test", inputs=("ma_image",), trainable=False)

    with pytest.raises(ValueError, match="registered as 'li2' has card name 'other'"):
        METHODS.register("li2", Other)
    with pytest.raises(ValueError, match="'li' is already registered"):
        METHODS.register("li", type("Li", (Other,), {"card": MethodCard("li", "x", ("ma_image",), False)}))
    with pytest.raises(TypeError, match="must be a MARMethod"):
        METHODS.register("module", torch.nn.Module)


def test_other_registries_share_the_type():
    from marbench.evaluation.protocols import PROTOCOLS
    from marbench.evaluation.weights import WEIGHTS
    from marbench.physics.geometry import PRESETS

    for reg in (PROTOCOLS, WEIGHTS, PRESETS):
        assert isinstance(reg, Registry) and len(reg) > 0
        with pytest.raises(KeyError, match="known: \\["):
            reg.get("no-such-name")


def test_third_party_method_from_a_separately_installed_distribution(tmp_path):
    src = tmp_path / "src"
    (src / "marbench_dummy").mkdir(parents=True)
    (src / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "marbench-dummy"
        version = "0.1"
        [project.entry-points."marbench.methods"]
        dummy-mean = "marbench_dummy:MeanFill"
        [tool.setuptools]
        packages = ["marbench_dummy"]
    """))
    (src / "marbench_dummy" / "__init__.py").write_text(textwrap.dedent("""
        import torch
        from marbench.method import MARMethod, MethodCard

        class MeanFill(MARMethod):
            card = MethodCard(name="dummy-mean", paper="test", inputs=("ma_image", "metal_mask"), trainable=False)

            def restore(self, batch, physics):
                return torch.where(batch["metal_mask"], batch["ma_image"].mean(), batch["ma_image"])
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True)
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(site)!r})
        from marbench.method import METHODS
        cls = METHODS.get("dummy-mean")
        batch = {{"ma_image": torch.tensor([[[[1.0, 3.0]]]]), "metal_mask": torch.tensor([[[[False, True]]]])}}
        print(cls().predict_step(batch).tolist())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[[[[1.0, 2.0]]]]"
