import torch

import diffguide as dg


def test_mnist_split_is_fixed_balanced_and_disjoint():
    train_images, train_labels = dg.load_digits("train")
    test_images, test_labels = dg.load_digits("test")
    assert train_images.shape == (4000, 1, 28, 28) and test_images.shape == (1000, 1, 28, 28)
    assert torch.bincount(train_labels).tolist() == [400] * 10
    assert torch.bincount(test_labels).tolist() == [100] * 10
    assert train_images.dtype == torch.float32 and 0 <= train_images.min() and train_images.max() <= 1
    # no test image appears in the train split
    train_keys = {bytes(img.numpy().tobytes()) for img in (train_images * 255).round().to(torch.uint8)}
    test_keys = [bytes(img.numpy().tobytes()) for img in (test_images * 255).round().to(torch.uint8)]
    assert not any(key in train_keys for key in test_keys)
    again, _ = dg.load_digits("test")
    assert torch.equal(again, test_images)


def test_sklearn_digits_for_fast_tests():
    images, labels = dg.load_digits("train", source="sklearn")
    test_images, _ = dg.load_digits("test", source="sklearn")
    assert images.shape[1:] == (1, 8, 8) and len(images) + len(test_images) == 1797
    assert labels.unique().tolist() == list(range(10))


def test_bad_split_or_source_is_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown split"):
        dg.load_digits("validation")
    with pytest.raises(ValueError, match="unknown digits source"):
        dg.load_digits("test", source="cifar")
