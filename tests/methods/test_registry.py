import subprocess
import sys
import textwrap

import pytest
import torch

from marbench.method import MARMethod
from marbench.registry import available_methods, get_method, register


def test_in_tree_methods_are_registered_with_cards():
    methods = available_methods()
    assert {"uncorrected", "li", "nmar", "unet", "adn", "oscnet", "oscnet_plus"} <= set(methods)
    for name, cls in methods.items():
        assert issubclass(cls, MARMethod) and cls.card.name == name and cls.card.paper and cls.card.needs


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(KeyError, match="unknown method 'lii'.*'li'"):
        get_method("lii")


def test_a_name_cannot_be_taken_twice():
    with pytest.raises(ValueError, match="already registered"):
        @register("li")
        class Other(MARMethod):
            pass


def test_third_party_method_from_a_separately_installed_distribution(tmp_path, monkeypatch):
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
            card = MethodCard(name="dummy-mean", paper="test", needs=("ma_image", "metal_mask"), trainable=False)

            def restore(self, batch):
                return torch.where(batch["metal_mask"], batch["ma_image"].mean(), batch["ma_image"])
    """))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True)
    monkeypatch.syspath_prepend(str(site))
    cls = get_method("dummy-mean")
    assert cls.card.name == "dummy-mean"
    batch = {"ma_image": torch.tensor([[[[1.0, 3.0]]]]), "metal_mask": torch.tensor([[[[False, True]]]])}
    assert cls().predict_step(batch).tolist() == [[[[1.0, 2.0]]]]
