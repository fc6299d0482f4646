"""`pep demo`: PEP on a small synthetic CTR task, next to the same model with a full table.

Both FMs train with the published recipe (Adam with coupled L2 1e-5, batch 1024; lr 3e-3 and a
threshold start of -6 so that a short run prunes) on
planted data where features need different embedding sizes; the demo prints validation AUC,
the PEP table's sparsity and learned sizes, and milliseconds per training step of each.
"""

import time

import torch
from sklearn.metrics import roc_auc_score
from tqdm import tqdm

from .data import make_synthetic_ctr
from .models import FactorizationMachine, FieldEmbedding
from .modules import PEPEmbedding

FIELD_DIMS = [2000, 1000, 500, 200, 100, 50, 20, 10]


def _split(data, seed):
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(order)), int(0.9 * len(order))
    parts = order[: cut[0]], order[cut[0]: cut[1]], order[cut[1]:]
    return [(data.x[p], data.y[p]) for p in parts]


@torch.no_grad()
def _auc(model, x, y, device):
    model.eval()
    scores = torch.cat([model(xb.to(device)).cpu() for xb in x.split(8192)])
    model.train()
    return roc_auc_score(y.numpy(), scores.numpy())


def _train_epoch(model, optimizer, x, y, device, batch_size, generator, label):
    loss_fn = torch.nn.BCEWithLogitsLoss()
    order = torch.randperm(len(y), generator=generator)
    seconds, steps = 0.0, 0
    for idx in tqdm(order.split(batch_size), desc=label, leave=False, mininterval=1.0, disable=None):
        xb, yb = x[idx].to(device), y[idx].to(device)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss_fn(model(xb), yb).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        steps += 1
    return 1e3 * seconds / steps


def run_demo(epochs=8, samples=200_000, embedding_dim=16, threshold_init=-6.0, lr=3e-3, device="cpu",
             backend="auto", seed=0, log=print):
    device = torch.device(device)
    torch.manual_seed(seed)
    data = make_synthetic_ctr(samples, FIELD_DIMS, embedding_dim=embedding_dim // 2, seed=seed)
    (x_tr, y_tr), (x_va, y_va), _ = _split(data, seed)
    models = {
        "full table": FactorizationMachine(FIELD_DIMS, FieldEmbedding(FIELD_DIMS, embedding_dim)),
        "PEP": FactorizationMachine(FIELD_DIMS, PEPEmbedding(sum(FIELD_DIMS), embedding_dim, field_dims=FIELD_DIMS,
                                                             threshold_init=threshold_init, backend=backend)),
    }
    pep = models["PEP"].embedding
    log(f"synthetic CTR: {samples} samples, fields {FIELD_DIMS}, table {pep.num_embeddings} x {embedding_dim}, "
        f"device {device}, {torch.get_num_threads()} threads\n{pep}")
    log(f"{'epoch':>5} {'full AUC':>9} {'PEP AUC':>8} {'sparsity':>9} {'full ms/step':>13} {'PEP ms/step':>12}")
    optimizers = {name: torch.optim.Adam(m.to(device).parameters(), lr=lr, weight_decay=1e-5) for name, m in models.items()}
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        ms, auc = {}, {}
        for name, model in models.items():
            ms[name] = _train_epoch(model, optimizers[name], x_tr, y_tr, device, 1024, generator, f"epoch {epoch} {name}")
            auc[name] = _auc(model, x_va, y_va, device)
        log(f"{epoch:>5} {auc['full table']:>9.4f} {auc['PEP']:>8.4f} {pep.sparsity():>9.1%} "
            f"{ms['full table']:>13.2f} {ms['PEP']:>12.2f}")
    sizes = pep.dims_per_row().cpu()
    true_sizes = data.true_dims
    log(f"learned sizes: mean {sizes.float().mean():.2f} of {embedding_dim} dims; rows kept {int((sizes > 0).sum())} "
        f"of {len(sizes)}; mean learned size of features with no useful dim {sizes[true_sizes == 0].float().mean():.2f}, "
        f"with >= {embedding_dim // 4} useful dims {sizes[true_sizes >= embedding_dim // 4].float().mean():.2f}")
    return auc, pep.sparsity()
