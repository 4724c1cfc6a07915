# BoostNet (Yu et al., AAAI 2023): every exit trains on CE(f_i + sg(E_{i-1}), y), E_i = r (f_i + E_{i-1}),
# summed over the exits, and answers with the boosted ensemble; r = 0.5 and Gradient Equilibrium on
# the MSDNet (the reference's msdnet_ge) as in all the reference's scripts.
technique = dict(type='BoostNet', gradient_equilibrium=True, reweight=0.5)
