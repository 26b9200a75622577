import torch

from marbench.converters import hu_to_mu, hu_to_unit, mu_to_hu, unit_to_hu, window


def test_hu_and_attenuation_follow_the_aapm_convention():
    hu = torch.tensor([-1000.0, 0.0, 1000.0, 3000.0])
    mu = hu_to_mu(hu, 0.02)
    torch.testing.assert_close(mu, torch.tensor([0.0, 0.02, 0.04, 0.08]))  # mu = HU/1000*0.02 + 0.02
    torch.testing.assert_close(mu_to_hu(mu, 0.02), hu)


def test_window_and_unit_scaling():
    torch.testing.assert_close(window(torch.tensor([-800.0, -500.0, 400.0, 1300.0, 3000.0]), -500, 1300),
                               torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    hu = torch.tensor([-1000.0, 0.0, 2500.0])
    torch.testing.assert_close(hu_to_unit(hu), torch.tensor([0.0, 0.5, 1.75]))
    torch.testing.assert_close(unit_to_hu(hu_to_unit(hu)), hu)
