"""Sample quality of a trained run: do class-conditional samples look like their class?

A judge classifier (scikit-learn SVC on raw pixels) is trained on real
held-out images of the run's source data; the score is its accuracy on collaborative samples
generated with known labels. Chance is 1/num_classes.

    python -m collafuse.benchmarks.sample_quality RUN_DIR [-n PER_CLASS]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.svm import SVC

from collafuse.runs import Run, generate


def fit_judge(images: torch.Tensor, labels: torch.Tensor, seed: int = 0) -> SVC:
    """An RBF SVC on flattened pixels in [-1, 1]; images (N,C,H,W), labels (N,)."""
    return SVC(C=10.0, gamma="scale", random_state=seed).fit(images.flatten(1).numpy(), labels.numpy())


def judge_accuracy(judge: SVC, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((judge.predict(images.flatten(1).clamp(-1, 1).numpy()) == labels.numpy()).mean())


def conditional_sample_accuracy(run: Run, per_class: int = 20, seed: int = 1234) -> dict:
    """Judge accuracy on ``per_class`` samples per class for every client, plus the judge's own held-out accuracy."""
    if run.num_classes == 0:
        raise ValueError("run is unconditional: there are no labels to check samples against")
    data, splits = run.load_data()
    # The judge learns from images the clients never trained on, and is checked on members.
    train_idx = torch.cat([splits.nonmembers, splits.aux])
    judge = fit_judge(data.images[train_idx], data.labels[train_idx])
    heldout = judge_accuracy(judge, data.images[splits.members], data.labels[splits.members])
    n = per_class * run.num_classes
    per_client = []
    for k in range(len(run.client_models)):
        samples = generate(run, k, n, seed)
        per_client.append(judge_accuracy(judge, samples, torch.arange(n) % run.num_classes))
    return {
        "judge_accuracy_on_real_members": heldout,
        "sample_accuracy_per_client": per_client,
        "sample_accuracy": float(np.mean(per_client)),
        "chance": 1.0 / run.num_classes,
        "samples_per_client": n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("-n", "--per-class", type=int, default=20)
    args = parser.parse_args()
    print(json.dumps(conditional_sample_accuracy(Run.load(args.run), args.per_class), indent=1))


if __name__ == "__main__":
    main()
