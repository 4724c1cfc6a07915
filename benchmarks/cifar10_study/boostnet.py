# BoostNet: every exit trains on CE(f_i + sg(E_{i-1}), y) and answers with the boosted ensemble (r = 0.5),
# with Gradient Equilibrium on the MSDNet as in all the reference's scripts.
_base_ = ['./_base_.py', '../../recipes/_base_/techniques/boostnet.py']
