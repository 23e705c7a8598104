#include "common/source_archive.h"

#include <archive.h>
#include <archive_entry.h>
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <memory>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace kiln {
namespace fs = std::filesystem;
namespace {

struct Output {
  std::string data;
  uint64_t limit;
  bool overflow = false;
};

la_ssize_t WriteCallback(struct archive*, void* client, const void* buf, size_t n) {
  auto* out = static_cast<Output*>(client);
  if (out->data.size() + n > out->limit) {
    out->overflow = true;
    return -1;
  }
  out->data.append(static_cast<const char*>(buf), n);
  return static_cast<la_ssize_t>(n);
}

absl::Status ArchiveError(struct archive* a, absl::string_view what) {
  const char* msg = archive_error_string(a);
  return absl::InvalidArgumentError(absl::StrCat(what, ": ", msg ? msg : "unknown libarchive error"));
}

// Lists entries below `root` in a stable order, relative, without .git.
absl::Status Walk(const fs::path& root, const fs::path& rel, std::vector<fs::path>& out,
                  const ArchiveLimits& limits) {
  std::vector<fs::path> names;
  std::error_code ec;
  for (fs::directory_iterator it(root / rel, ec), end; !ec && it != end; it.increment(ec)) {
    std::string name = it->path().filename().string();
    if (name == ".git") continue;
    names.push_back(rel / name);
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot read ", (root / rel).string(), ": ", ec.message()));
  std::sort(names.begin(), names.end());
  for (const auto& p : names) {
    out.push_back(p);
    if (out.size() > limits.max_entries) {
      return absl::ResourceExhaustedError(absl::StrCat("more than ", limits.max_entries, " entries in ", root.string()));
    }
    if (fs::is_directory(fs::symlink_status(root / p))) {
      if (absl::Status s = Walk(root, p, out, limits); !s.ok()) return s;
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> PackDirectory(const std::string& dir, const ArchiveLimits& limits) {
  const fs::path root(dir);
  if (!fs::is_directory(root)) return absl::NotFoundError(absl::StrCat("not a directory: ", dir));
  std::vector<fs::path> entries;
  if (absl::Status s = Walk(root, "", entries, limits); !s.ok()) return s;

  Output out{.data = {}, .limit = limits.max_archive_bytes};
  struct archive* a = archive_write_new();
  auto free_archive = absl::MakeCleanup([a] { archive_write_free(a); });
  archive_write_add_filter_gzip(a);
  archive_write_set_format_pax_restricted(a);
  archive_write_set_bytes_in_last_block(a, 1);
  if (archive_write_open2(a, &out, nullptr, WriteCallback, nullptr, nullptr) != ARCHIVE_OK) {
    return ArchiveError(a, "cannot start archive");
  }
  struct archive_entry* entry = archive_entry_new();
  auto free_entry = absl::MakeCleanup([entry] { archive_entry_free(entry); });
  std::string buf;
  for (const auto& rel : entries) {
    const fs::path full = root / rel;
    struct stat st;
    if (::lstat(full.c_str(), &st) != 0) {
      return absl::NotFoundError(absl::StrCat("cannot stat ", full.string()));
    }
    archive_entry_clear(entry);
    archive_entry_set_pathname(entry, rel.c_str());
    archive_entry_set_mtime(entry, 0, 0);
    archive_entry_set_uid(entry, 0);
    archive_entry_set_gid(entry, 0);
    std::string link_target;
    if (S_ISDIR(st.st_mode)) {
      archive_entry_set_filetype(entry, AE_IFDIR);
      archive_entry_set_perm(entry, 0755);
    } else if (S_ISLNK(st.st_mode)) {
      link_target = fs::read_symlink(full).string();
      archive_entry_set_filetype(entry, AE_IFLNK);
      archive_entry_set_perm(entry, 0777);
      archive_entry_set_symlink(entry, link_target.c_str());
    } else if (S_ISREG(st.st_mode)) {
      archive_entry_set_filetype(entry, AE_IFREG);
      archive_entry_set_perm(entry, (st.st_mode & 0111) ? 0755 : 0644);
      archive_entry_set_size(entry, st.st_size);
    } else {
      continue;  // Sockets, fifos, devices: not source.
    }
    if (archive_write_header(a, entry) != ARCHIVE_OK) {
      if (out.overflow) break;
      return ArchiveError(a, absl::StrCat("cannot add ", rel.string()));
    }
    if (S_ISREG(st.st_mode)) {
      std::ifstream in(full, std::ios::binary);
      buf.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
      if (!in.good() && !in.eof()) return absl::DataLossError(absl::StrCat("cannot read ", full.string()));
      if (archive_write_data(a, buf.data(), buf.size()) < 0) {
        if (out.overflow) break;
        return ArchiveError(a, absl::StrCat("cannot add ", rel.string()));
      }
    }
  }
  if (!out.overflow && archive_write_close(a) != ARCHIVE_OK && !out.overflow) {
    return ArchiveError(a, "cannot finish archive");
  }
  if (out.overflow) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "source of ", dir, " is larger than ", limits.max_archive_bytes >> 20,
        " MiB compressed; build from a smaller flake directory"));
  }
  return std::move(out.data);
}

absl::Status UnpackArchive(absl::string_view archive, const std::string& dest,
                           const ArchiveLimits& limits) {
  if (archive.size() > limits.max_archive_bytes) {
    return absl::ResourceExhaustedError("source archive over the size limit");
  }
  struct archive* in = archive_read_new();
  auto free_in = absl::MakeCleanup([in] { archive_read_free(in); });
  archive_read_support_filter_gzip(in);
  archive_read_support_format_tar(in);
  if (archive_read_open_memory(in, archive.data(), archive.size()) != ARCHIVE_OK) {
    return ArchiveError(in, "source archive");
  }
  struct archive* disk = archive_write_disk_new();
  auto free_disk = absl::MakeCleanup([disk] { archive_write_free(disk); });
  archive_write_disk_set_options(
      // Names are checked below before `dest` is prefixed, so the absolute-path
      // guard (which would refuse the prefixed name) is not used.
      disk, ARCHIVE_EXTRACT_PERM | ARCHIVE_EXTRACT_SECURE_SYMLINKS | ARCHIVE_EXTRACT_SECURE_NODOTDOT);

  uint64_t entries = 0, total = 0;
  struct archive_entry* entry;
  for (;;) {
    int rc = archive_read_next_header(in, &entry);
    if (rc == ARCHIVE_EOF) break;
    if (rc != ARCHIVE_OK) return ArchiveError(in, "source archive");
    if (++entries > limits.max_entries) return absl::ResourceExhaustedError("source archive has too many entries");
    std::string name = archive_entry_pathname(entry) ? archive_entry_pathname(entry) : "";
    if (name.empty() || name[0] == '/') {
      return absl::InvalidArgumentError(absl::StrCat("source archive entry with absolute or empty name '", name, "'"));
    }
    for (absl::string_view part : absl::StrSplit(name, '/')) {
      if (part == "..") return absl::InvalidArgumentError(absl::StrCat("source archive entry escapes the tree: '", name, "'"));
    }
    const auto type = archive_entry_filetype(entry);
    if (type != AE_IFREG && type != AE_IFDIR && type != AE_IFLNK) {
      return absl::InvalidArgumentError(absl::StrCat("source archive entry '", name, "' is not a file, directory or symlink"));
    }
    if (type == AE_IFLNK) {
      // A link may only point inside the tree.
      std::string target = archive_entry_symlink(entry) ? archive_entry_symlink(entry) : "";
      fs::path resolved = (fs::path("/root") / fs::path(name).parent_path() / target).lexically_normal();
      if (target.empty() || target[0] == '/' || !absl::StartsWith(resolved.string(), "/root/")) {
        return absl::InvalidArgumentError(absl::StrCat("source archive symlink '", name, "' points outside the tree"));
      }
    }
    total += static_cast<uint64_t>(std::max<la_int64_t>(0, archive_entry_size(entry)));
    if (total > limits.max_unpacked_bytes) return absl::ResourceExhaustedError("source archive unpacks past the size limit");
    archive_entry_set_pathname(entry, (fs::path(dest) / name).c_str());
    archive_entry_set_uid(entry, ::geteuid());
    archive_entry_set_gid(entry, ::getegid());
    if (archive_write_header(disk, entry) != ARCHIVE_OK) return ArchiveError(disk, absl::StrCat("cannot unpack ", name));
    if (type == AE_IFREG) {
      const void* block;
      size_t size;
      la_int64_t offset;
      for (;;) {
        int r = archive_read_data_block(in, &block, &size, &offset);
        if (r == ARCHIVE_EOF) break;
        if (r != ARCHIVE_OK) return ArchiveError(in, "source archive");
        if (archive_write_data_block(disk, block, size, offset) != ARCHIVE_OK) {
          return ArchiveError(disk, absl::StrCat("cannot write ", name));
        }
      }
    }
    if (archive_write_finish_entry(disk) != ARCHIVE_OK) return ArchiveError(disk, absl::StrCat("cannot finish ", name));
  }
  return absl::OkStatus();
}

}  // namespace kiln
