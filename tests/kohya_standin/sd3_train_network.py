"""Stand-in for a per-architecture script: overrides on_step_start (like SD3) and process_batch
(like Anima), each calling super(), and has a fix-up line in its main block (like Anima)."""

import train_network

from library import train_util

CALLS = []


class Sd3NetworkTrainer(train_network.NetworkTrainer):
    def on_step_start(self, args, accelerator, network, text_encoders, unet, batch, weight_dtype,
                      is_train: bool = True):
        CALLS.append(("on_step_start", is_train))
        super().on_step_start(args, accelerator, network, text_encoders, unet, batch, weight_dtype, is_train=is_train)

    def process_batch(self, batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                      accelerator, args, text_encoding_strategy, tokenize_strategy, is_train=True,
                      train_text_encoder=True, train_unet=True):
        CALLS.append(("process_batch", is_train))
        return super().process_batch(batch, text_encoders, unet, network, vae, noise_scheduler, vae_dtype, weight_dtype,
                                     accelerator, args, text_encoding_strategy, tokenize_strategy, is_train,
                                     train_text_encoder, train_unet)


def setup_parser():
    parser = train_network.setup_parser()
    parser.add_argument("--attn_mode", type=str, default="torch")
    return parser


if __name__ == "__main__":
    parser = setup_parser()

    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)

    if args.attn_mode == "sdpa":
        args.attn_mode = "torch"  # backward compatibility

    trainer = Sd3NetworkTrainer()
    trainer.train(args)
    CALLS.append(("attn_mode", args.attn_mode))
