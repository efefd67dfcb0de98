// safetensors: byte-exact output against the format reference, round trips, and every
// malformed input rejected with the file and the problem named.
#include <gtest/gtest.h>

#include <ATen/ATen.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "checkpoint/safetensors.h"
#include "tests/common/temp_dir.h"

namespace strata {
namespace {

using testing::TempDir;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

// A file image from a header text (padded or not, as given) and data bytes.
std::string image(const std::string& header, const std::string& data = "") {
  const uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

std::string parse_error(const std::string& bytes) {
  try {
    parse_safetensors_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(),
                             "x.safetensors");
  } catch (const CheckpointError& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected CheckpointError";
  return "";
}

TEST(Safetensors, WritesTheReferenceBytes) {
  // The worked example of the format reference: one BF16 tensor [1.0, -2.0], format pt.
  TempDir dir;
  write_safetensors(dir / "w.safetensors", {{"w", at::tensor({1.0f, -2.0f}).to(at::kBFloat16)}});
  const std::string bytes = read_bytes(dir / "w.safetensors");
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"w":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}  )";
  EXPECT_EQ(bytes, image(header, std::string("\x80\x3f\x00\xc0", 4)));
  EXPECT_EQ(bytes.size(), 100u);
  EXPECT_FALSE(std::filesystem::exists(dir / "w.safetensors.tmp"));
}

TEST(Safetensors, RoundTripsEveryDtypeInTheReferenceOrder) {
  TempDir dir;
  std::vector<std::pair<std::string, at::Tensor>> tensors = {
      {"b.f32", at::randn({3, 4})},
      {"a.bf16", at::randn({5}).to(at::kBFloat16)},
      {"c.f16", at::randn({2, 2}).to(at::kHalf)},
      {"d.i64", at::arange(6, at::kLong).view({2, 3})},
      {"e.f64", at::randn({1}, at::kDouble)},
      {"f.u8", at::arange(4, at::kByte)},
      {"g.bool", at::tensor({1, 0}, at::kInt).to(at::kBool)},
      {"h.scalar", at::tensor(3.5f)},
      {"i.empty", at::zeros({0, 3})},
      {"j.i32", at::arange(3, at::kInt)},
  };
  write_safetensors(dir / "all.safetensors", tensors, {{"step", "7"}});
  SafetensorsFile file(dir / "all.safetensors");
  EXPECT_EQ(file.header().metadata.at("step"), "7");
  EXPECT_EQ(file.header().metadata.at("format"), "pt");
  for (const auto& [name, t] : tensors) {
    at::Tensor back = file.tensor(name);
    EXPECT_EQ(back.scalar_type(), t.scalar_type()) << name;
    EXPECT_TRUE(at::equal(back, t)) << name;
  }
  // Data order: 64-bit types first (I64 before F64: enum order reversed), then F32, ...
  std::vector<std::string> order;
  for (const auto& e : file.header().entries) order.push_back(e.name);
  EXPECT_EQ(order.front(), "d.i64");
  EXPECT_EQ(order[1], "e.f64");
  EXPECT_EQ(order.back(), "g.bool");
  EXPECT_EQ(file.header().data_offset % 8, 0u);
  // Partial reads touch only the requested range.
  EXPECT_TRUE(
      at::equal(file.read_elements("b.f32", 5, 4), tensors[0].second.flatten().narrow(0, 5, 4)));
  EXPECT_THROW(file.read_elements("b.f32", 10, 4), CheckpointError);
  EXPECT_THROW(file.tensor("missing"), CheckpointError);
}

TEST(Safetensors, AcceptsTheEmptyFileOfTheReference) {
  const std::string empty = image("{}      ");
  EXPECT_EQ(empty.size(), 16u);
  const SafetensorsHeader h =
      parse_safetensors_header(reinterpret_cast<const uint8_t*>(empty.data()), empty.size(), "e");
  EXPECT_TRUE(h.entries.empty());
  // Surrounding JSON whitespace is accepted, as by the reference reader.
  const std::string spaced = image("\t\n{}\r ");
  EXPECT_NO_THROW(parse_safetensors_header(reinterpret_cast<const uint8_t*>(spaced.data()),
                                           spaced.size(), "s"));
}

TEST(Safetensors, RejectsMalformedFilesNamingTheProblem) {
  const std::string t = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string data8(8, '\0');
  struct Case {
    std::string bytes, expected;
  } cases[] = {
      {"abc", "3 bytes, shorter than the 8-byte header length"},
      {std::string("\xff\xff\xff\xff\x00\x00\x00\x00", 8), "exceeds the limit of 100000000 bytes"},
      {std::string("\x40\x00\x00\x00\x00\x00\x00\x00{}", 10),
       "runs past the end of the 10-byte file"},
      {image("{\"t\": [1, 2"), "header is not valid UTF-8 JSON"},
      {image("{\"\xff\xfe\": 1}"), "header is not valid UTF-8 JSON"},
      {image("[1, 2]"), "header is not a JSON object"},
      {image("{" + t + "," + t + "}", data8), "tensor 't' appears twice"},
      {image(R"({"t":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}})", data8),
       "unknown dtype \"F33\""},
      {image(R"({"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", data8),
       "non-integer or negative size"},
      {image(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8),
       "non-integer or negative size"},
      {image(R"({"t":{"dtype":"F32","shape":[2]}})", data8), "lacks dtype, shape or data_offsets"},
      {image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", data8),
       "ends (byte 0) before it begins (byte 8)"},
      {image(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')),
       "starts at byte 4 but the previous one ends at 0"},
      {image(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8),
       "needs 12 bytes, its data_offsets give 8"},
      {image("{" + t + R"(,"u":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", data8),
       "starts at byte 4 but the previous one ends at 8"},
      {image("{" + t + "}", data8 + "x"), "trailing bytes"},
      {image("{" + t + "}", "1234"), "truncated"},
      {image(R"({"__metadata__":{"step":7}})"), "__metadata__ value of 'step' is not a string"},
      {image(R"({"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}})", "12"),
       "not a whole number of bytes"},
  };
  for (const Case& c : cases) {
    const std::string e = parse_error(c.bytes);
    EXPECT_NE(e.find("x.safetensors is not a valid safetensors file: "), std::string::npos) << e;
    EXPECT_NE(e.find(c.expected), std::string::npos)
        << "got: " << e << "\nexpected: " << c.expected;
  }
}

TEST(Safetensors, WriterRejectsDuplicateNamesAndKeepsTheOldFile) {
  TempDir dir;
  write_safetensors(dir / "m.safetensors", {{"a", at::ones({1})}});
  EXPECT_THROW(
      write_safetensors(dir / "m.safetensors", {{"a", at::ones({1})}, {"a", at::ones({1})}}),
      CheckpointError);
  EXPECT_TRUE(at::equal(SafetensorsFile(dir / "m.safetensors").tensor("a"), at::ones({1})));
  EXPECT_THROW(write_safetensors(dir / "no/such/dir.safetensors", {{"a", at::ones({1})}}),
               CheckpointError);
}

}  // namespace
}  // namespace strata
