// Host build only (csrc/host/): the stand-ins for <cuda_bf16.h>.
#pragma once
#include "host/cuda_host.h"
