"""A fixed corpus of mixed-length texts for the embeddings benchmarks: short search queries,
sentences and paragraph-length passages, in English and Chinese, drawn from small word lists with
a fixed seed (so every run, and every system in a run, sees the same texts)."""

import random

EN = ("the a of to in and for on with how what why when which best cheap fast new old large small "
      "model server data network memory request batch token query document search index vector "
      "embedding latency throughput cluster storage price weather city river mountain train flight "
      "hotel recipe coffee garden music history science language book film market energy health "
      "doctor school student teacher engine car bicycle phone camera battery screen window water "
      "summer winter morning evening people company product review error update install configure "
      "deploy measure compare improve explain describe because although however therefore while "
      "after before during between across against around without within under over near far").split()
ZH = ("我们 你们 他们 今天 明天 昨天 城市 天气 火车 飞机 酒店 咖啡 音乐 历史 科学 语言 电影 市场 能源 健康 "
      "医生 学校 学生 老师 汽车 手机 相机 电池 屏幕 窗户 夏天 冬天 早上 晚上 公司 产品 评论 错误 更新 安装 "
      "模型 服务器 数据 网络 内存 请求 查询 文档 搜索 索引 向量 延迟 吞吐量 集群 存储 价格 河流 山 花园 "
      "因为 虽然 但是 所以 如果 可以 需要 应该 非常 比较 最好 便宜 快速 新的 旧的 大的 小的 怎么 为什么").split()


def _text(rng, words, chinese):
    pick = [rng.choice(ZH if chinese else EN) for _ in range(words)]
    if chinese:
        return "".join(pick) + rng.choice(["。", "？", "！", ""])
    s = " ".join(pick)
    return s[0].upper() + s[1:] + rng.choice([".", "?", "", "!"])


def corpus(n=600, seed=20261203):
    """`n` texts: 45% short queries (2 to 8 words), 35% sentences (10 to 30 words), 20% passages
    (60 to 220 words, some past the model's 256 tokens); about a third Chinese."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chinese = rng.random() < 0.33
        kind = rng.random()
        if kind < 0.45:
            words = rng.randint(2, 8)
        elif kind < 0.80:
            words = rng.randint(10, 30)
        else:
            words = rng.randint(60, 220)
        out.append(_text(rng, words, chinese))
    return out
