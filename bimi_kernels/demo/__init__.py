"""The brain MRI demo: BIMI pre-training of a small U-Net on brain MRI slices, cluster pictures,
and few-label fine-tuning with the checkpoint chosen on a validation block, following the BIMI
authors' protocol within a time budget. Two tasks: tissue (MNI ICBM152, from nilearn's wheel) and
lobes (AAL on Colin27, from the Debian package mricron-data). Run it with `bimi demo` or
`python -m bimi_kernels demo` (see `bimi_kernels.demo.cli`). Needs the `demo` extras: nibabel,
nilearn, matplotlib, tqdm."""
