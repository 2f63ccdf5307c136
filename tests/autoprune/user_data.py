"""Data sets of a user's own, imported by path in the tests (--data package.module:factory)."""

import torch
from torch.utils.data import Dataset, TensorDataset


class Stripes(Dataset):
    """3×16×16 float images of three classes (which channel is bright), built on demand."""

    def __init__(self, n: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 3, (n,), generator=generator)
        self.noise = torch.randn(n, 3, 16, 16, generator=generator) * 0.3

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.noise[i].clone()
        x[int(self.labels[i])] += 1.0
        return x, int(self.labels[i])


def stripes():
    return Stripes(96, 0), Stripes(30, 1), Stripes(30, 2)


def stripes_without_val():
    return Stripes(120, 0), None, Stripes(30, 2)


def stripes_train_val_only():
    return [Stripes(96, 0), Stripes(30, 1)]


def one_dataset():
    return Stripes(10, 0)


def four_things():
    return Stripes(10, 0), None, None, None


def no_train():
    return None, Stripes(10, 1), None


def raises():
    raise FileNotFoundError("/data/my-images is not mounted")


def vectors():
    return TensorDataset(torch.zeros(8, 5), torch.zeros(8, dtype=torch.long)), Stripes(4, 1), None


not_callable = 3
