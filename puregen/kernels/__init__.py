"""Update steps of the purifiers and the noise contract.

`philox` is the single definition of every random number (counter layout,
key, uniform and normal transforms). `reference` holds the plain-torch fp32
steps (Langevin update, DDPM forward noising, DDPM reverse step) that every
faster implementation is tested against.
"""
