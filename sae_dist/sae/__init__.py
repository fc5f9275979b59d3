"""sae_dist.sae: the TopK sparse autoencoder of Gao et al. 2024 ("Scaling and evaluating sparse
autoencoders") and the architectures compared against it (`registry`: relu, prolu, jumprelu,
batchtopk, matryoshka, tree, soft_topk), all behind one interface (`base.SparseAutoencoder`):
config, modules, initialisation, export/load; the kernels of the TopK step are `sae_dist.kernels`."""

from sae_dist.sae.base import DeadLatentTracker, SparseAutoencoder, normalized_mse
from sae_dist.sae.config import SAEConfig, default_k_aux
from sae_dist.sae.export import ExportedSAE, ExportedTopKSAE, check_d_in, export_sae, load_sae
from sae_dist.sae.init import geometric_median, init_b_dec_, tied_init_
from sae_dist.sae.registry import ARCHITECTURES, architecture_class, build_sae
from sae_dist.sae.topk import TopKSAE, TrainOutput

__all__ = [
    "SAEConfig", "default_k_aux", "TopKSAE", "TrainOutput", "normalized_mse", "DeadLatentTracker",
    "geometric_median", "init_b_dec_", "tied_init_", "export_sae", "load_sae", "ExportedSAE", "ExportedTopKSAE",
    "check_d_in", "SparseAutoencoder", "ARCHITECTURES", "architecture_class", "build_sae",
]
