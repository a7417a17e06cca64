// CRC-32 (zlib's: reflected polynomial 0xEDB88320, pre- and post-inverted) for the shard checksums.
#pragma once

#include <cstddef>
#include <cstdint>

namespace seme {

// Whether this CPU runs the carry-less-multiply version (x86 with PCLMULQDQ and SSE4.1), unless
// SEME_CPU_ISA=baseline.
bool crc32_accelerated();

// zlib.crc32(data, crc): the same value, 5-8x faster where crc32_accelerated(), else bytewise.
uint32_t crc32(const uint8_t* data, size_t len, uint32_t crc);

}  // namespace seme
