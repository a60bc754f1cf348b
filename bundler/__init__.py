"""GPU weight files + tokenizer -> .task / .litertlm bundles and Android/iOS asset packages."""
