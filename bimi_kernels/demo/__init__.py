"""The brain MRI demo: BIMI pre-training of a small U-Net on the MNI ICBM152 template, cluster
pictures, and few-label fine-tuning. Run it with `bimi demo` or `python -m bimi_kernels demo`
(see `bimi_kernels.demo.cli`). Needs the `demo` extras: nibabel, nilearn, matplotlib, tqdm."""
