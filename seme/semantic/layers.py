"""Layer-wise interpolation (METHOD §4): which source layers feed each pivot layer, and how much."""
from __future__ import annotations


def layer_map(pivot_layers: int, source_layers: int) -> list[tuple[int, int, float]]:
    """For each pivot layer l: (a, b, λ) so that the source contributes (1 − λ)·θ[a] + λ·θ[b],
    reading the source at u = l·(L_src − 1)/(L_piv − 1)."""
    if pivot_layers == 1 or source_layers == 1:
        return [(0, 0, 0.0)] * pivot_layers
    out = []
    for layer in range(pivot_layers):
        u = layer * (source_layers - 1) / (pivot_layers - 1)
        a = min(int(u), source_layers - 1)
        lam = u - a
        b = min(a + 1, source_layers - 1)
        if lam < 1e-9:
            lam, b = 0.0, a
        out.append((a, b, lam))
    return out
