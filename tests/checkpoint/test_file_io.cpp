// Durable writes and checksums: SHA-256 against its published test vectors, block checksums
// cut at exact block boundaries, the streaming writer agreeing with a re-read of the file,
// atomic replacement, and I/O errors that name the path.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "checkpoint/file_io.h"
#include "tests/common/temp_dir.h"

namespace strata {
namespace {

using testing::TempDir;

std::string sha256_of(const std::string& text) {
  Sha256 sha;
  sha.update(text.data(), text.size());
  return sha.hex_digest();
}

TEST(Sha256, MatchesPublishedTestVectors) {
  EXPECT_EQ(sha256_of(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_of("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_of("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

class HashingFileWriterModes : public ::testing::TestWithParam<bool> {};

// Buffered and O_DIRECT writers (the latter on a temp dir that may refuse O_DIRECT, which
// exercises the fallback) give the same bytes and checksums.
TEST_P(HashingFileWriterModes, DigestEqualsReReadAtEveryBlockBoundary) {
  TempDir dir;
  const uint64_t block = kChecksumBlockBytes;
  for (uint64_t size : {uint64_t{0}, uint64_t{1}, uint64_t{4095}, uint64_t{4097}, block - 1, block,
                        block + 1, 2 * block + 3}) {
    std::string data(size, '\0');
    for (uint64_t i = 0; i < size; ++i) data[i] = static_cast<char>((i * 131 + size) & 0xff);
    const std::string path = dir / ("f" + std::to_string(size));
    HashingFileWriter out(path, /*hash_thread=*/true, /*direct=*/GetParam());
    // Uneven write sizes, crossing block boundaries mid-write.
    for (uint64_t done = 0; done < size;) {
      const uint64_t n = std::min<uint64_t>(size - done, 1000003);
      out.write(data.data() + done, n);
      done += n;
    }
    const FileDigest written = out.finish();
    const FileDigest reread = digest_file(path);
    EXPECT_EQ(written.size, size);
    EXPECT_EQ(std::filesystem::file_size(path), size);
    EXPECT_EQ(written.sha256, sha256_of(data)) << size;
    EXPECT_EQ(written.sha256, reread.sha256) << size;
    EXPECT_EQ(written.block_xxh3, reread.block_xxh3) << size;
    const uint64_t blocks = size == 0 ? 1 : (size + block - 1) / block;
    EXPECT_EQ(written.block_xxh3.size(), 16 * blocks) << size;
    if (size > block) {
      EXPECT_EQ(written.block_xxh3.substr(0, 16), xxh3_hex(data.data(), block));
      EXPECT_EQ(written.block_xxh3.substr(16, 16),
                xxh3_hex(data.data() + block, std::min<uint64_t>(block, size - block)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(BufferedAndDirect, HashingFileWriterModes, ::testing::Bool());

TEST(HashingFileWriter, AnUnfinishedFileIsRemoved) {
  TempDir dir;
  {
    HashingFileWriter out(dir / "partial");
    out.write("abc", 3);
  }
  EXPECT_FALSE(std::filesystem::exists(dir / "partial"));
}

TEST(FileIo, ErrorsNameThePath) {
  TempDir dir;
  try {
    HashingFileWriter out(dir / "no/such/dir/file");
    FAIL() << "expected IoError";
  } catch (const IoError& e) {
    EXPECT_NE(std::string(e.what()).find("no/such/dir/file"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("No such file or directory"), std::string::npos);
  }
  EXPECT_THROW(digest_file(dir / "missing"), IoError);
  EXPECT_THROW(fsync_directory(dir / "missing"), IoError);
  EXPECT_THROW(rename_durable(dir / "missing", dir / "other"), IoError);
}

TEST(FileIo, AtomicWriteReplacesTheWholeContent) {
  TempDir dir;
  const std::string path = dir / "latest";
  write_file_atomic(path, "step-0000001\n");
  write_file_atomic(path, "step-0000002\n");
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "step-0000002");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

}  // namespace
}  // namespace strata
