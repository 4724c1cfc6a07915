# Gradient Equilibrium (IMTA phase I): every exit's gradient reaches the shared blocks rescaled.
technique = dict(type='CrossEntropy', gradient_equilibrium=True)
