//! SSH to cluster machines with russh. (Being written.)
