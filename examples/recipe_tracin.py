"""Recipe: per-example gradients for data attribution (a TracIn-style score).

TracIn (Pruthi et al. 2020) scores how much training example i helped a test
example z: the sum over saved checkpoints of lr · ⟨∇L(x_i), ∇L(z)⟩. Per-example
gradients give all the ⟨g_i, g_z⟩ of a batch in one call. Here: one checkpoint,
a training set with a few flipped labels, and the most harmful examples for the
test predictions (most negative scores) are mostly the flipped ones.
"""

import torch
import torch.nn.functional as F
from torch import nn

import persample


def flat(grads):
    return torch.cat([g.flatten(1) for g in grads.values()], 1)  # [n, P]


def main(n_train: int = 200, n_flipped: int = 10) -> tuple[list[int], list[int]]:
    torch.manual_seed(0)
    w = torch.randn(8, 3)
    x_train, x_test = torch.randn(n_train, 8), torch.randn(50, 8)
    y_train, y_test = (x_train @ w).argmax(1), (x_test @ w).argmax(1)
    flipped = torch.randperm(n_train)[:n_flipped]
    y_train[flipped] = (y_train[flipped] + 1) % 3  # corrupt a few labels

    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(100):  # train to one checkpoint
        optimizer.zero_grad()
        F.cross_entropy(model(x_train), y_train).backward()
        optimizer.step()

    g_train = flat(persample.per_sample_grads(model, F.cross_entropy, x_train, y_train))  # [n_train, P]
    g_test = flat(persample.per_sample_grads(model, F.cross_entropy, x_test, y_test))  # [50, P]
    scores = 0.5 * g_train @ g_test.T  # lr · ⟨g_i, g_z⟩: [n_train, 50]
    z = int(scores.sum(0).argmin())  # the test example helped least
    print(
        f"test example {z}: most helpful training examples {scores[:, z].argsort(descending=True)[:3].tolist()}, "
        f"most harmful {scores[:, z].argsort()[:3].tolist()}"
    )
    self_influence = 0.5 * g_train.pow(2).sum(1)  # lr · ‖g_i‖²
    suspects = self_influence.argsort(descending=True)[:n_flipped].tolist()
    found = sorted(set(suspects) & set(flipped.tolist()))
    print(
        f"{len(found)} of the {n_flipped} training examples with the largest self-influence have flipped "
        f"labels: {found}"
    )
    return suspects, flipped.tolist()


if __name__ == "__main__":
    main()
