import torch

from marbench.converters import (
    adn_to_hu,
    hu_to_adn,
    hu_to_deeplesion_mu,
    hu_to_mu,
    hu_to_oscnet,
    hu_to_unit,
    mu_to_hu,
    oscnet_to_hu,
    unit_to_hu,
    window,
)


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


def test_deeplesion_conventions_of_adn_and_oscnet():
    hu = torch.tensor([-1000.0, 0.0, 1000.0, 1500.0])
    torch.testing.assert_close(hu_to_deeplesion_mu(hu), torch.tensor([0.0, 0.192, 0.384, 0.48]))
    # ADN: mu clipped to [0, 0.5] then [-1, 1]; water -> 0.192 / 0.5 * 2 - 1
    torch.testing.assert_close(hu_to_adn(hu), torch.tensor([-1.0, -0.232, 0.536, 0.92]))
    torch.testing.assert_close(adn_to_hu(hu_to_adn(hu)), hu)
    assert hu_to_adn(torch.tensor([-2000.0, 3000.0])).tolist() == [-1.0, 1.0]  # the published clip
    # OSCNet: mu clipped to [0, 1] then x255
    torch.testing.assert_close(hu_to_oscnet(hu), torch.tensor([0.0, 48.96, 97.92, 122.4]))
    torch.testing.assert_close(oscnet_to_hu(hu_to_oscnet(hu)), hu)
    assert hu_to_oscnet(torch.tensor([5000.0])).item() == 255.0
