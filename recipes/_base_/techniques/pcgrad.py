# Gradient deconfliction (Wang & Li, ICIP 2020): PCGrad between the exits' gradients on the shared
# parameters (one backward per exit); 'symmetric' / 'protect_deeper' do it at the branch points in one.
technique = dict(type='PCGrad', scope='global', order='random', protect_deeper=False)
