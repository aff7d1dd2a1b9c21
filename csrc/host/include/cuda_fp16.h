// Host build only (csrc/host/): the stand-ins for <cuda_fp16.h>.
#pragma once
#include "host/cuda_host.h"
