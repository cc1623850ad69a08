"""Plotly figures built only from result objects; each function returns a `go.Figure`.

Submodules: `style` (shared colours), `stream` (anatomy), `decomposition`, `lens`, `ablation`,
`highway`. Import the function you need from its submodule.
"""
