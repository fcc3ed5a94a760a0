"""Benchmark: weighted k-NN evaluation, reference algorithm vs simpool.evaluation.knn.

Synthetic clustered features stand in for a frozen backbone's output: ``classes`` random centres in
``dim`` dimensions, each feature a centre plus Gaussian noise, L2-normalised. The reference
(facebookresearch/dino ``eval_knn.py``) is re-implemented below as it runs there: one full pass per k,
queries in chunks of ``n_test // 500``, similarity + topk + a one-hot vote weighted by exp(sim / T).
Ours runs one search for max(k) and votes with scatter_add. Both see the same tensors in the same run.

Usage::

    python benchmarks/knn.py                      # 20k x 384 bank, 2k queries, 100 classes
    python benchmarks/knn.py --repeats 3 --n_test 5000
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch
from torch.nn.functional import normalize

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmarks.reference_knn import reference_knn  # noqa: E402
from simpool.evaluation.knn import knn_classifier, knn_predict  # noqa: E402

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


def clustered_features(
    n_train: int, n_test: int, dim: int, classes: int, noise: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bank and query features drawn around shared class centres, L2-normalised."""
    generator = torch.Generator().manual_seed(seed)
    centres = normalize(torch.randn(classes, dim, generator=generator), dim=1)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(0, classes, (n,), generator=generator)
        points = centres[labels] + noise * torch.randn(n, dim, generator=generator) / dim**0.5
        return normalize(points, dim=1), labels

    train_features, train_labels = draw(n_train)
    test_features, test_labels = draw(n_test)
    return train_features, train_labels, test_features, test_labels


def run_reference(data, classes: int):
    train_features, train_labels, test_features, test_labels = data
    results, predictions = {}, {}
    for k in KS:  # eval_knn.py calls knn_classifier once per k
        top1, top5, preds, _ = reference_knn(
            train_features, train_labels, test_features, test_labels, k, TEMPERATURE, classes
        )
        results[k], predictions[k] = (top1, top5), preds[:, 0]
    return results, predictions


def run_ours(data, classes: int):
    train_features, train_labels, test_features, test_labels = data
    return knn_classifier(train_features, train_labels, test_features, test_labels, list(KS), TEMPERATURE,
                          num_classes=classes)


def timed(fn, cuda: bool):
    if cuda:  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def interleaved_times(fns, repeats: int, cuda: bool):
    """Run the functions in turn, ``repeats`` rounds, so that load from other processes hits them alike.

    Returns, per function, the list of wall times and the last result."""
    times, results = [[] for _ in fns], [None for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            seconds, results[i] = timed(fn, cuda)
            times[i].append(seconds)
    return times, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n_train", type=int, default=20_000)
    parser.add_argument("--n_test", type=int, default=2_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--noise", type=float, default=4.5,
                        help="noise norm relative to a class centre (4.5: top-1 between ~45 and ~80%%)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the features live, e.g. cpu or cuda")
    args = parser.parse_args()
    if args.n_test < 500:
        parser.error("the reference needs --n_test >= 500 (imgs_per_chunk = n_test // 500)")

    data = clustered_features(args.n_train, args.n_test, args.dim, args.classes, args.noise, args.seed)
    data = tuple(tensor.to(args.device) for tensor in data)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, nproc={os.cpu_count()}, "
          f"torch threads={torch.get_num_threads()}, torch {torch.__version__}")
    if data[0].is_cuda:
        print(f"device: {torch.cuda.get_device_name(data[0].device)}")
    print(f"bank {args.n_train} x {args.dim}, {args.n_test} queries, {args.classes} classes, "
          f"k={list(KS)}, T={TEMPERATURE}, repeats={args.repeats}")

    (ref_times, our_times), ((ref_results, ref_predictions), our_results) = interleaved_times(
        [lambda: run_reference(data, args.classes), lambda: run_ours(data, args.classes)],
        args.repeats,
        cuda=data[0].is_cuda,
    )
    # The minimum is the run least disturbed by other processes; the ratio of minima compares like with like.
    ref_time, our_time = min(ref_times), min(our_times)
    our_predictions = knn_predict(data[0], data[1], data[2], list(KS), TEMPERATURE, args.classes)

    header = ("k", "ref top1", "ours top1", "ref top5", "ours top5", "top1 pred agree")
    print(f"{header[0]:>4} " + " ".join(f"{h:>9}" for h in header[1:5]) + f" {header[5]:>16}")
    for k in KS:
        agree = (our_predictions[k][:, 0] == ref_predictions[k]).float().mean().item() * 100
        print(f"{k:>4} {ref_results[k][0]:9.2f} {our_results[k][0]:9.2f} {ref_results[k][1]:9.2f} "
              f"{our_results[k][1]:9.2f} {agree:15.2f}%")
    print(f"reference: {ref_time:.3f} s (runs: {', '.join(f'{t:.3f}' for t in ref_times)})")
    print(f"ours:      {our_time:.3f} s (runs: {', '.join(f'{t:.3f}' for t in our_times)})")
    print(f"speed-up:  {ref_time / our_time:.1f}x")


if __name__ == "__main__":
    main()
