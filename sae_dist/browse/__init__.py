"""sae_dist.browse: static HTML feature browser (`sae-browse`) for an exported SAE over an activation store.

`build_browser` (sae_dist/browse/build.py) writes index.html (latent table, sortable client-side),
latents/<i>.html (top / random activating contexts, activation histogram, N2G explanation, logit
effects), style.css and browser.js, and the same latents as SAEDashboard's Neuronpedia batch files
(`sae_dist.browse.neuronpedia`); `sae_dist.browse.cli:main` is the Hydra console script.
"""

from sae_dist.browse.build import BrowseOptions, build_browser, logit_effects, scan_store

__all__ = ["BrowseOptions", "build_browser", "logit_effects", "scan_store"]
