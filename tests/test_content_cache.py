"""``marbench.content_cache.ContentCache``: values by content, per namespace, least recently used dropped."""
import pytest
import torch

from marbench.content_cache import ContentCache


def test_values_are_kept_by_content_namespace_shape_and_dtype_and_the_least_recently_used_go_first():
    cache, calls = ContentCache(max_items=3), []

    def compute(xs):
        calls.append(xs.clone())
        return [float(x.sum()) for x in xs]

    a, b, c, d = (torch.full((2, 2), float(v)) for v in (1, 2, 3, 4))
    assert cache(torch.stack([a, b, a]), compute, "sum") == [4.0, 8.0, 4.0]
    assert len(calls) == 1 and torch.equal(calls[0], torch.stack([a, b]))  # each distinct item computed once
    assert cache(torch.stack([b, a]), compute, "sum") == [8.0, 4.0] and len(calls) == 1
    cache(a[None], compute, "other")  # another namespace: computed again
    cache(a.double()[None], compute, "sum")  # same values, other dtype: another item; b, used least recently, goes
    assert len(calls) == 3 and len(cache) == 3
    cache(b[None], compute, "sum")
    assert len(calls) == 4  # and a ("sum") went
    cache(torch.stack([c, d]), compute, "sum")  # a ("other") and a in double go
    assert len(cache) == 3 and len(calls) == 5
    assert cache(b[None], compute, "sum") == [8.0] and len(calls) == 5
    cache(a.double()[None], compute, "sum")
    cache(a[None], compute, "sum")
    assert len(calls) == 7
    cache.clear()
    assert len(cache) == 0


def test_items_of_a_one_dimensional_batch_are_scalars_and_are_kept_too():
    cache, calls = ContentCache(max_items=4), []

    def compute(xs):
        calls.append(xs.clone())
        return [2 * float(x) for x in xs]

    assert cache(torch.tensor([3.0, 1.0, 3.0]), compute, "double") == [6.0, 2.0, 6.0]
    assert cache(torch.tensor([1.0]), compute, "double") == [2.0]
    assert len(calls) == 1 and torch.equal(calls[0], torch.tensor([3.0, 1.0]))


def test_an_item_of_several_batches_is_keyed_by_every_part_and_computed_from_the_missing_ones():
    cache, calls = ContentCache(max_items=8), []

    def compute(parts):
        images, scale = parts
        calls.append(len(images))
        return [float(i.sum()) * float(s) for i, s in zip(images, scale, strict=True)]

    images, scale = torch.ones(3, 1, 2, 2), torch.tensor([1.0, 2.0, 1.0])
    assert cache((images, scale), compute, "scaled") == [4.0, 8.0, 4.0] and calls == [2]  # items 0 and 2 alike
    # the same image with another scale, and another image with a scale seen before: both new items
    assert cache((torch.stack([images[0], 2 * images[0]]), torch.tensor([3.0, 1.0])), compute, "scaled") == [12.0, 8.0]
    assert calls == [2, 2] and cache((images, scale), compute, "scaled") == [4.0, 8.0, 4.0] and calls == [2, 2]
    with pytest.raises(ValueError, match=r"as many items each, found \[3, 2\]"):
        cache((images, scale[:2]), compute, "scaled")


def test_a_compute_that_returns_another_number_of_values_is_refused():
    with pytest.raises(ValueError, match="compute returned 1 values for 2 items"):
        ContentCache(4)(torch.arange(2.0)[:, None], lambda xs: [0.0], "broken")
    with pytest.raises(ValueError, match="at least one item"):
        ContentCache(0)
