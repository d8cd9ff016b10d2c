"""selfie-lite: Spread Preference Annotation (SPA) on one GPU, or on a CPU with the tiny preset."""

from selfie_lite.compat import quiet_bnb_kernels_warning
from selfie_lite.numerics import pin_mkl_reproducibility

# Before torch runs anything: MKL reads its reproducibility mode once, at its first call (see numerics.py).
pin_mkl_reproducibility()
# Before anything imports transformers (whose trainer_utils imports PEFT, which imports bitsandbytes): bitsandbytes
# and `kernels` log offline-fetch warnings on import on AVX512-BF16 CPUs (compat.py).
quiet_bnb_kernels_warning()

__version__ = "0.1.0"
