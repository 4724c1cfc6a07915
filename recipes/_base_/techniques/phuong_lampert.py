# Distillation-based training (Phuong & Lampert, ICCV 2019): every exit but the last learns from the
# labels and from the last exit (detached) at a temperature T that starts at 1.0 and grows by 1.05 after
# every update whose teacher's mean max-probability exceeds 0.5; C = 0.5, and the loss gain None is
# the reference's 2 * 5 / N for N exits. adaptive=False with temperature=4.0: its constant-T variant.
technique = dict(type='PhuongLampert', distillation_weight=0.5, gain=None, temperature=1.0, adaptive=True,
                 max_prob=0.5, growth=1.05)
