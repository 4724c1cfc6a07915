# Gradient Equilibrium (IMTA phase I): every exit's gradient reaches the shared blocks rescaled.
technique = dict(loss='ce', gradient_equilibrium=True)
