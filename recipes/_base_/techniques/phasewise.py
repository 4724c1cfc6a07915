# Phase-wise training (Kubaty et al.'s protocol, the ZTW lineage): the backbone alone on its own head's
# loss, then everything jointly, then the exit heads alone on the frozen backbone; each phase starts from
# the weights of the one before and is evaluated in its own folder.
phases = [
    dict(name='backbone', technique=dict(type='CrossEntropy', regime='backbone')),
    dict(name='joint', technique=dict(type='CrossEntropy', regime='joint')),
    dict(name='heads', technique=dict(type='CrossEntropy', regime='heads_only')),
]
