# Harmonized dense distillation (Wang & Li, AAAI 2021): every exit learns from the labels and every
# later exit, with loss weights learned on batches of the held-out split (needs data.val_fraction > 0).
technique = dict(type='HDKD', alpha=0.5, temperature=4.0, lr=3e-4, init='uniform', ratio_reg=True, interval=1)
